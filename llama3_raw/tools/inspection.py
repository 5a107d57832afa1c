"""`python -m llama3_raw inspect [PROMPT]`: look inside one forward pass over a prompt.

Writes into an output folder:
  logit_lens.md / logit_lens.png   after every block, the residual stream put through the final norm
                                   and the output projection: top token and its probability per position
  attention_layer_NN.png           per layer, every head's causal attention weights, with token labels
  shapes.txt                       every named intermediate with its shape and dtype, in forward order
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ..checkpoints import open_model
from ..errors import UserError
from ..events import run_tool
from ..files import make_folder, write_text
from ..locks import writing_alone
from ..model import at_least_fp32, forward, rms_norm
from ..params import ModelParams
from ..tokenizer import Tokenizer
from .common import add_common_arguments, tool_main
from .pictures import plot_attention, plot_logit_lens

Tensor = torch.Tensor


def logit_lens(weights: dict[str, Tensor], params: ModelParams, record: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Top token id and its probability after every block: two (n_layers, S) tensors, batch row 0."""
    top_ids, top_probs = [], []
    for layer in range(params.n_layers):
        residual = record[f"layers.{layer}.output"][0]  # (S, D)
        normed = rms_norm(residual, weights["norm.weight"], params.norm_eps)
        probs = torch.softmax(at_least_fp32(normed @ weights["output.weight"].T), dim=-1)  # (S, V)
        prob, token = probs.max(dim=-1)
        top_ids.append(token)
        top_probs.append(prob)
    return torch.stack(top_ids), torch.stack(top_probs)


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A short printable label: specials by name, newlines and tabs made visible."""
    for name, special_id in tokenizer.special_tokens.items():
        if special_id == token_id:
            return name.strip("<|>")
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def shapes_trace(record: dict[str, Tensor]) -> str:
    width = max(len(name) for name in record)
    lines = [f"{name:<{width}}  {str(tuple(t.shape)):<22} {str(t.dtype).removeprefix('torch.')}" for name, t in record.items()]
    return "\n".join(lines) + "\n"


def logit_lens_table(labels_in: list[str], top_ids: Tensor, top_probs: Tensor, tokenizer: Tokenizer) -> str:
    header = "| block | " + " | ".join(f"`{label}`" for label in labels_in) + " |"
    rows = [header, "|---" * (len(labels_in) + 1) + "|"]
    for layer in range(top_ids.shape[0]):
        cells = [f"`{token_label(tokenizer, int(t))}` {float(p):.2f}" for t, p in zip(top_ids[layer], top_probs[layer])]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def parse_layers(text: str, n_layers: int) -> list[int]:
    """"all", or a comma list of indices and ranges like "0,3-5"."""
    if text == "all":
        return list(range(n_layers))
    layers = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise UserError(f"--layers {text!r} is not a list like 0,3-5 or 'all'; use layer numbers from 0 to "
                            f"{n_layers - 1}.") from None
        if not 0 <= low <= high < n_layers:  # checked before the range is expanded: 0-99999999999 is one number
            raise UserError(f"--layers {text!r} names layers outside 0..{n_layers - 1} (or a range that runs "
                            f"backwards); this model has {n_layers} layers.")
        layers.update(range(low, high + 1))
    return sorted(layers)


def inspect_prompt(weights, params: ModelParams, tokenizer: Tokenizer, prompt: str, out_dir: Path,
                   layers: list[int]) -> dict:
    """Run one forward pass with every intermediate recorded and write the views. Returns a summary."""
    prompt_ids = tokenizer.encode(prompt, bos=True)
    if len(prompt_ids) > params.context_len:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens but the model's context holds {params.context_len}; shorten it.")
    record: dict[str, Tensor] = {}
    with torch.inference_mode():
        forward(weights, params, torch.tensor([prompt_ids], device=weights["norm.weight"].device), record=record)
        top_ids, top_probs = logit_lens(weights, params, record)
    top_ids, top_probs = top_ids.cpu(), top_probs.float().cpu()
    labels = [token_label(tokenizer, t) for t in prompt_ids]

    make_folder(out_dir)
    write_text(out_dir / "shapes.txt", shapes_trace(record))
    write_text(out_dir / "logit_lens.md", logit_lens_table(labels, top_ids, top_probs, tokenizer))
    attention_files = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # CJK/emoji labels: a box is fine
        top_labels = [[token_label(tokenizer, int(t)) for t in row] for row in top_ids]
        plot_logit_lens(out_dir / "logit_lens.png", labels, top_labels, top_probs)
        for layer in layers:
            path = out_dir / f"attention_layer_{layer:02d}.png"
            plot_attention(path, layer, record[f"layers.{layer}.attention.weights"][0].cpu(), labels)
            attention_files.append(path.name)
    last = [token_label(tokenizer, int(t)) for t in top_ids[:, -1]]
    return {"prompt_tokens": prompt_ids, "last_position_top_tokens": last,
            "last_position_top_probs": [round(float(p), 4) for p in top_probs[:, -1]],
            "files": ["shapes.txt", "logit_lens.md", "logit_lens.png", *attention_files]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("inspect_out"), help="output folder (default inspect_out/)")
    parser.add_argument("--layers", default="all", help="layers to draw attention maps for: 'all' or e.g. 0,3-5")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")


def run(args: argparse.Namespace) -> int:
    def work():
        with writing_alone(args.out, "--out"):  # checked and held before the model is loaded
            model = open_model(args.ckpt_dir, args.tokenizer, args.dtype, args.device, threads=args.threads)
            prompt = args.prompt if args.prompt is not None else model.defaults["prompt"]
            layers = parse_layers(args.layers, model.params.n_layers)
            summary = inspect_prompt(model.weights, model.params, model.tokenizer, prompt, args.out, layers)
        print(f"next-token guess at the last position, block by block ({model.directory}, {model.source_format} format):")
        for layer, (token, prob) in enumerate(zip(summary["last_position_top_tokens"], summary["last_position_top_probs"])):
            print(f"  block {layer:2d}: {token:>16} {prob:.3f}")
        print(f"wrote {', '.join(summary['files'][:4])}{' ...' if len(summary['files']) > 4 else ''} to {args.out}/")

    return run_tool(work)


def main(argv: list[str] | None = None) -> int:
    return tool_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
