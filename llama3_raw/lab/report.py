"""The lab's picture (every variant's validation curve on one set of axes, in nats per character) and its table."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ..files import write_png  # noqa: E402

SAMPLE_CHARS = 90  # of each variant's sample in the table: a line or two


def plot_curves(lab: dict, path: Path) -> None:
    """Validation nats/char against the step for every variant, Llama 3 in black on top: on the left all of them,
    on the right zoomed in on those that cannot see the token they predict (no_mask would flatten them)."""
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100, gridspec_kw={"width_ratios": [1, 1.6]})
    colors = plt.get_cmap("tab10")
    honest = [r for r in lab["variants"] if r["name"] != "no_mask"]
    for ax in (whole, zoom):
        for i, result in enumerate(lab["variants"]):
            steps, losses = zip(*result["val_curve"])
            reference = result["name"] == "llama3"
            ax.plot(steps, losses, "--" if result["name"] == "no_mask" else "-", marker="o", markersize=3,
                    linewidth=2.8 if reference else 1.5, color="black" if reference else colors(i % 10),
                    zorder=3 if reference else 2, label=f"{result['label']}: {result['val_nats_per_char']:.3f}")
        ax.set_xlabel(f"step ({lab['settings']['train']['batch_size']} windows of "
                      f"{lab['settings']['train']['context']} tokens per step, seed {lab['seed']})")
        ax.grid(alpha=0.3)
    whole.set_ylabel("validation loss (nats per character)")
    whole.set_title("every variant")
    if honest and len(honest[0]["val_curve"]) > 1:
        low = min(min(loss for _, loss in r["val_curve"]) for r in honest)
        high = max(r["val_curve"][1][1] for r in honest)  # from the second evaluation on
        zoom.set_ylim(low - 0.03, high + 0.03)
    zoom.set_title("zoomed in: the variants that cannot see the next token")
    zoom.legend(fontsize=8, title="variant: final validation nats/char", title_fontsize=8)
    fig.suptitle("Llama 3 with one piece taken out, trained alike on Tiny Shakespeare")
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
