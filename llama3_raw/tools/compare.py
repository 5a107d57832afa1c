"""`python -m llama3_raw compare --ckpt-dir DIR`: this project's forward pass against Meta's, block by block.

Both run on the same weights (shared, not copied) and the same prompt. For each block's output it
prints the largest absolute difference and that difference relative to the largest reference value,
then the first block over the tolerance, the logits' difference and top-1 agreement. `--perturb KEY`
adds noise to one of this project's weights first, to show what a bug looks like.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

from ..checkpoints import DTYPES, open_folder, load_model
from ..checkpoints.defaults import non_negative_float
from ..checkpoints.quantized import quantized_file
from ..errors import UserError
from ..events import run_tool
from ..model import forward
from ..params import ModelParams
from ..threads import use_threads
from .common import add_common_arguments, tool_main
from .reference import import_reference, meta_block_outputs, meta_transformer

# Relative to the largest reference value. Two float32 implementations of the same math differ by
# rounding (about 1e-8 here); bfloat16 keeps 8 mantissa bits.
DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
PERTURB_SCALE = 0.05  # --perturb noise, in units of the weight's own standard deviation


@dataclass(frozen=True)
class Difference:
    name: str
    max_abs: float
    max_rel: float  # max |ours - reference| / max |reference|


@dataclass(frozen=True)
class Comparison:
    blocks: list[Difference]
    logits: Difference
    top1_agreement: float  # fraction of positions whose most likely next token is the same
    tolerance: float
    first_bad_block: int | None

    @property
    def ok(self) -> bool:
        return self.first_bad_block is None and self.logits.max_rel <= self.tolerance


def difference(name: str, ours: torch.Tensor, reference: torch.Tensor) -> Difference:
    gap = (ours.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    return Difference(name, gap, gap / scale if scale > 0 else gap)


def compare_with_reference(weights: dict[str, torch.Tensor], reference_weights: dict[str, torch.Tensor],
                           params: ModelParams, prompt_ids: list[int], tolerance: float) -> Comparison:
    """Run ours on `weights` and Meta's on `reference_weights` (the same, unless a test perturbs ours)."""
    tokens = torch.tensor([prompt_ids], device=weights["norm.weight"].device)
    record: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        logits, _ = forward(weights, params, tokens, record=record)
        reference = meta_transformer(params, reference_weights, max_seq_len=len(prompt_ids))
        ref_blocks, ref_logits = meta_block_outputs(reference, tokens)
    blocks = [difference(f"block {i}", record[f"layers.{i}.output"], ref) for i, ref in enumerate(ref_blocks)]
    first_bad = next((i for i, d in enumerate(blocks) if d.max_rel > tolerance), None)
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return Comparison(blocks, difference("logits", logits, ref_logits), agreement, tolerance, first_bad)


def perturbed(weights: dict[str, torch.Tensor], key: str, scale: float = PERTURB_SCALE) -> dict[str, torch.Tensor]:
    """A copy of the dict in which `key` (only) gets Gaussian noise of `scale` times its own spread."""
    if key not in weights:
        raise UserError(f"--perturb {key} is not a weight of this model; use a key like layers.1.attention.wk.weight.")
    tensor = weights[key]
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(0)).to(tensor)
    return {**weights, key: tensor + scale * tensor.float().std().to(tensor.dtype) * noise}


def report_text(comparison: Comparison) -> str:
    lines = [f"{'':10} {'max abs diff':>14} {'max rel diff':>14}"]
    for d in [*comparison.blocks, comparison.logits]:
        flag = "  <-- over tolerance" if d.max_rel > comparison.tolerance else ""
        lines.append(f"{d.name:10} {d.max_abs:14.3e} {d.max_rel:14.3e}{flag}")
    first = comparison.first_bad_block
    lines.append(f"tolerance (relative): {comparison.tolerance:g}; first block over it: "
                 f"{'none' if first is None else first}")
    lines.append(f"top-1 agreement of the logits: {100 * comparison.top1_agreement:.1f}% of positions")
    lines.append("MATCH" if comparison.ok else "MISMATCH")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="default float32, Meta's reference arithmetic, whatever run's --dtype auto picks")
    parser.add_argument("--tolerance", type=non_negative_float, help="relative tolerance per block (default 1e-5 fp32, 2e-2 bf16)")
    parser.add_argument("--perturb", metavar="KEY", help="add 5%% noise to this weight on our side, e.g. "
                        "layers.1.attention.wk.weight, to see how a bug shows up")
    parser.add_argument("--json", action="store_true", help="print the comparison as one JSON object")


def run(args: argparse.Namespace) -> int:
    outcome = {}

    def work():
        import_reference()  # say how to install it before any slow work
        folder = open_folder(args.ckpt_dir, args.tokenizer)
        use_threads(args.threads, folder.params.parameter_count())
        if (saved := quantized_file(folder.directory)) is not None:
            raise UserError(f"{folder.directory} holds {saved[0]} weights, which Meta's "
                            f"reference cannot run; compare the "
                            f"checkpoint they were quantized from.")
        prompt = args.prompt if args.prompt is not None else folder.defaults["prompt"]
        model = load_model(folder, dtype=args.dtype, show_progress=not args.json)
        prompt_ids = model.tokenizer.encode(prompt, bos=True)
        ours = perturbed(model.weights, args.perturb) if args.perturb else model.weights
        tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[model.dtype]
        comparison = compare_with_reference(ours, model.weights, model.params, prompt_ids, tolerance)
        outcome["ok"] = comparison.ok
        if args.json:
            print(json.dumps({**asdict(comparison), "ok": comparison.ok}))
        else:
            print(f"{model.directory}: {len(prompt_ids)} prompt tokens, {args.dtype}, this project vs Meta's llama_models")
            print(report_text(comparison))

    code = run_tool(work)
    return code if code else (0 if outcome.get("ok") else 1)


def main(argv: list[str] | None = None) -> int:
    return tool_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
