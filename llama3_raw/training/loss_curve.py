"""The loss curve as a PNG: training and validation loss, both in nats per character, against the step."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..files import write_png  # noqa: E402


def plot_loss_curve(records: list[dict], path: Path, title: str) -> None:
    """`records` are the JSONL log's lines: {"kind": "train"|"val", "step": ..., "nats_per_char": ..., "full": ...}."""
    train = [(r["step"], r["nats_per_char"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["nats_per_char"]) for r in records if r["kind"] == "val" and not r.get("full")]
    full = [(r["step"], r["nats_per_char"]) for r in records if r["kind"] == "val" and r.get("full")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train (running mean over the log interval)", color="tab:blue", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (first eval_windows windows)", color="tab:orange")
    for step, loss in full:  # the final evaluation covers the whole validation split
        ax.plot([step], [loss], "s", color="tab:red", label="validation (whole split)")
        ax.annotate(f"{loss:.3f}", (step, loss), textcoords="offset points", xytext=(-4, 8), ha="right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)
