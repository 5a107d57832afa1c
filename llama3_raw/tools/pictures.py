"""The pictures `inspect` draws: the logit lens and one layer's attention maps, made to be read.

Both show tokens as labels with their leading spaces made visible (`␣the`), in full; the logit lens
wraps a long prompt into rows of at most LENS_ROW_TOKENS positions, as few as that takes and of
near-equal length (18 positions: two rows of 9, not 16 and 2), and the attention maps draw the cells a
query may not see (the future, masked) in grey, apart from the black of zero attention.
"""

import math
from pathlib import Path

import numpy as np
import torch

from ..files import write_png

LENS_ROW_TOKENS = 16  # positions per row of the logit lens: about a screen's width of readable cells
LABELED_POSITIONS = 64  # attention maps label every token up to this many, else every k-th
MASKED_COLOUR = "#c8c8c8"  # future cells: a light grey, never a value of the colour map
FONT = 8


def pyplot():
    """matplotlib's pyplot drawing into files; imported when a picture is drawn, since it takes a while to load."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def visible(label: str) -> str:
    """A label whose leading spaces show: " the" -> "␣the"."""
    stripped = label.lstrip(" ")
    return "␣" * (len(label) - len(stripped)) + stripped


def lens_panels(seq_len: int, most: int = LENS_ROW_TOKENS) -> list[range]:
    """The positions of each row of the logit lens: ceil(seq_len / most) rows, the first ones a position longer
    where they cannot all be equal, so that no row is a nearly empty tail (18 -> 9 + 9, 33 -> 11 + 11 + 11)."""
    n_rows = max(1, math.ceil(seq_len / most))
    short, longer = divmod(seq_len, n_rows)
    starts = [row * short + min(row, longer) for row in range(n_rows + 1)]
    return [range(start, stop) for start, stop in zip(starts, starts[1:])]


def plot_logit_lens(path: Path, labels_in: list[str], top_labels: list[list[str]], top_probs: torch.Tensor) -> None:
    """Blocks (rows) x positions (columns), the prompt wrapped into balanced rows (lens_panels);
    each cell: the top next-token guess and its probability, which also sets its colour."""
    plt = pyplot()
    n_layers, seq_len = top_probs.shape
    chunks = lens_panels(seq_len)
    width = len(chunks[0])
    fig, axes = plt.subplots(len(chunks), 1, squeeze=False, layout="constrained",
                             figsize=(1.0 * width + 2.5, len(chunks) * (0.42 * n_layers + 1.1) + 0.8))
    for ax, chunk in zip(axes[:, 0], chunks):
        probs = top_probs[:, chunk.start:chunk.stop].float().numpy()
        image = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                          extent=(chunk.start - 0.5, chunk.stop - 0.5, -0.5, n_layers - 0.5))
        ax.set_xlim(chunk.start - 0.5, chunk.start + width - 0.5)  # every row's cells equally wide
        for layer in range(n_layers):
            for pos in chunk:
                prob = float(top_probs[layer, pos])
                ax.text(pos, layer, f"{visible(top_labels[layer][pos])}\n{prob:.2f}", ha="center", va="center",
                        fontsize=FONT - 1, linespacing=0.9, color="black" if prob > 0.5 else "white")
        ax.set_xticks(list(chunk), [visible(labels_in[pos]) for pos in chunk], fontsize=FONT, rotation=30, ha="right")
        ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)], fontsize=FONT)
        ax.set_ylabel("after block", fontsize=FONT)
    axes[-1, 0].set_xlabel("input token (each cell guesses the token after it)", fontsize=FONT + 1)
    fig.suptitle("Logit lens: top next-token guess and its probability", fontsize=FONT + 3)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="probability", shrink=min(1.0, 3.0 / len(chunks)))
    write_png(path, fig, dpi=110)
    plt.close(fig)


def plot_attention(path: Path, layer: int, attention_weights: torch.Tensor, labels: list[str]) -> None:
    """One layer's heads as panels: row = query token, column = key token it attends to; future cells grey."""
    plt = pyplot()
    n_heads, seq_len, _ = attention_weights.shape
    cols = min(n_heads, 4 if seq_len <= 24 else 2)
    rows = math.ceil(n_heads / cols)
    panel = max(3.0, 0.13 * min(seq_len, LABELED_POSITIONS) + 1.4)  # inches: room for one readable label per token
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel + 1.2, rows * panel + 0.8), squeeze=False,
                             layout="constrained")
    future = np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1)
    cmap = plt.get_cmap("magma").with_extremes(bad=MASKED_COLOUR)
    step = math.ceil(seq_len / LABELED_POSITIONS)
    ticks = list(range(0, seq_len, step))
    shown = [visible(labels[i]) for i in ticks]
    image = None
    for head, ax in enumerate(axes.flat):
        if head >= n_heads:
            ax.axis("off")
            continue
        weights = np.ma.masked_array(attention_weights[head].float().numpy(), mask=future)
        image = ax.imshow(weights, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=FONT + 1)
        ax.set_xticks(ticks, shown, rotation=90, fontsize=FONT)
        ax.set_yticks(ticks, shown, fontsize=FONT)
    fig.suptitle(f"layer {layer} attention: row = query token, column = key token it attends to; "
                 f"grey = future (masked)", fontsize=FONT + 2)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="attention weight", shrink=min(1.0, 2.0 / rows))
    write_png(path, fig, dpi=100)
    plt.close(fig)
