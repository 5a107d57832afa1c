"""The lab's picture (every variant's validation curve on one set of axes, in nats per character) and its table."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..files import write_png  # noqa: E402

SAMPLE_CHARS = 90  # of each variant's sample in the table: a line or two


def plot_curves(lab: dict, path: Path) -> None:
    """Validation nats/char against the step for every variant; the final (whole split) value at its end."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, result in enumerate(lab["variants"]):
        steps, losses = zip(*result["val_curve"])
        style = "-" if result["name"] == "llama3" else "--" if result["name"] == "no_mask" else "-"
        width = 2.6 if result["name"] == "llama3" else 1.5
        ax.plot(steps, losses, style, marker="o", markersize=3, linewidth=width, color=colors(i % 10),
                label=f"{result['label']}: {result['val_nats_per_char']:.3f}")
    ax.set_xlabel(f"step (each variant: {lab['settings']['train']['batch_size']} windows of "
                  f"{lab['settings']['train']['context']} tokens per step, seed {lab['seed']})")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("Llama 3 with one piece taken out, trained alike on Tiny Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="variant: final validation nats/char", title_fontsize=8)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def table_markdown(lab: dict) -> str:
    """The results as a markdown table: loss, parameters, speed, cache size; then each variant's sample."""
    reference = next((r for r in lab["variants"] if r["name"] == "llama3"), None)
    lines = ["| variant | val nats/char | vs Llama 3 | val nats/token | parameters | KV cache bytes/token | "
             "tokens/s (training) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in lab["variants"]:
        delta = "" if reference is None or r is reference else f"{r['val_nats_per_char'] - reference['val_nats_per_char']:+.3f}"
        speed = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        lines.append(f"| {r['label']} | {r['val_nats_per_char']:.4f} | {delta} | {r['val_nats_per_token']:.3f} | "
                     f"{r['parameters']:,} | {r['kv_cache_bytes_per_token']:,} | {speed} |")
    lines += ["", "| variant | sample (temperature 0.8, the recipe's prompt and seed) |", "|---|---|"]
    for r in lab["variants"]:
        text = r["sample"][:SAMPLE_CHARS].replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
        lines.append(f"| {r['name']} | `{text}` |" if "`" not in text else f"| {r['name']} | {text} |")
    return "\n".join(lines) + "\n"
