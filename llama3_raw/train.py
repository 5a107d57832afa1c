"""Train a Llama 3 model from scratch: `python -m llama3_raw.train [--config RECIPE.json] [--out DIR] [--resume]`.

A thin command line over the training package (training/loop.py). The output directory holds, besides
Meta's files (training/export.py):
  train_state.pt    fp32 weights, optimizer state, step and RNG state, to --resume bit-identically
  train_log.jsonl   one line per log interval (train loss) and per evaluation (validation loss)
  loss_curve.png    both losses in nats per character
"""

import argparse
import sys
from pathlib import Path

from .checkpoints.defaults import positive_int, thread_count
from .errors import run_tool
from .training import DEFAULT_RECIPE, load_recipe, train
from .training.recipe import REPO_ROOT
from .training.state import STATE_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama3_raw.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE,
                        help=f"training recipe JSON (default {DEFAULT_RECIPE.relative_to(REPO_ROOT)})")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "shakespeare",
                        help="output directory (default runs/shakespeare; the shipped model is weights/shakespeare)")
    parser.add_argument("--resume", action="store_true", help=f"continue from DIR/{STATE_FILE}")
    parser.add_argument("--corpus", type=Path, help="text file to train on instead of the recipe's data.corpus")
    parser.add_argument("--stop-after", type=positive_int, metavar="STEP",
                        help="stop (and save a resumable checkpoint) after this step")
    parser.add_argument("--threads", type=thread_count, help="CPU threads (default: all cores; 1 is faster when another "
                        "busy process shares the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        recipe = load_recipe(args.config, args.corpus)
        result = train(recipe, args.out, args.resume, args.stop_after, not args.no_progress, args.threads)
        if result:
            print(f"validation: {result['nats_per_char']:.4f} nats/char; checkpoint in {args.out}", file=sys.stderr)

    return run_tool(work, f"interrupted; continue with --resume (from the last checkpoint in {args.out})")


if __name__ == "__main__":
    sys.exit(main())
