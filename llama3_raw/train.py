"""Train a Llama 3 model from scratch: `python -m llama3_raw.train [--config RECIPE.json] [--out DIR] [--resume]`.

Data-parallel on several processes, GPUs or machines: `torchrun --nproc-per-node N -m llama3_raw.train ...`
(the recipe's batch_size stays the global batch; rank 0 alone writes). On a GPU: `--device cuda`.

A thin command line over the training package (training/loop.py). The output directory holds, besides
Meta's files (training/export.py):
  train_state.pt    fp32 weights, optimizer state, step and RNG state, to --resume bit-identically
  train_log.jsonl   one line per log interval (train loss), per evaluation (validation loss) and its sample
  loss_curve.png    both losses in nats per character
"""

import argparse
import signal
import sys
from pathlib import Path

import torch

from .checkpoints.defaults import positive_int, thread_count
from .errors import ArgumentParser, UserError
from .events import run_tool, say
from .parallel import as_one_of, join_ranks
from .training import DEFAULT_RECIPE, TrainingStop, load_recipe, train
from .training.recipe import REPO_ROOT
from .training.loop import LOG_INTERVAL
from .training.state import LOG_FILE, STATE_FILE


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m llama3_raw.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE,
                        help=f"training recipe JSON (default {DEFAULT_RECIPE.relative_to(REPO_ROOT)})")
    parser.add_argument("--out", type=Path, default=Path("runs") / "shakespeare",
                        help="output directory (default runs/shakespeare; the shipped model is weights/shakespeare)")
    parser.add_argument("--resume", action="store_true", help=f"continue from DIR/{STATE_FILE}")
    parser.add_argument("--corpus", type=Path, help="text file to train on instead of the recipe's data.corpus")
    parser.add_argument("--stop-after", type=positive_int, metavar="STEP",
                        help="stop (and save a resumable checkpoint) after this step")
    parser.add_argument("--threads", type=thread_count, help="CPU threads (default: the cores that other work "
                        "leaves idle; 1 is faster when another busy process shares the cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (fp32), or cuda: bf16 autocast, fp32 weights and optimizer state (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resume_command(args: argparse.Namespace) -> str:
    config = f" --config {args.config}" if args.config != DEFAULT_RECIPE else ""
    corpus = f" --corpus {args.corpus}" if args.corpus is not None else ""
    return f"python -m llama3_raw.train --out {args.out}{config}{corpus} --resume"


def report(stop: TrainingStop, args: argparse.Namespace) -> str:
    """What happened, where everything is, and what to do next: printed on every stop. A stop by SIGTERM or
    SIGHUP (a scheduler's pre-emption, a closed terminal) is said in one line, for a job's log."""
    if stop.reason == "interrupted" and stop.signal != "SIGINT":
        return (f"training stopped by {stop.signal} after step {stop.step} of {stop.total_steps}, state saved to "
                f"{stop.state_path}; resume: {resume_command(args)}")
    how = {"finished": "finished", "stopped": "stopped as asked (--stop-after)",
           "interrupted": "interrupted (Ctrl-C)"}[stop.reason]
    lines = [f"training {how} at step {stop.step} of {stop.total_steps}."]
    if stop.last_val is not None:
        lines.append(f"validation at step {stop.last_val['step']}: {stop.last_val['nats_per_char']:.4f} nats/char.")
    lines.append(f"state: {stop.state_path} (fp32 weights, optimizer, random state); "
                 f"log: {args.out / LOG_FILE} ({stop.log_records} lines; a train loss every {LOG_INTERVAL} steps).")
    if stop.reason != "finished":
        lines.append(f"resume: {resume_command(args)}")
    if stop.exported_step is None:
        lines.append(f"runnable model: none yet; the first is exported at step {stop.next_export_step} "
                     f"(every evaluation exports one).")
    else:
        lines.append(f"runnable model: {args.out} holds the model of step {stop.exported_step}; run it with "
                     f"python run.py --ckpt-dir {args.out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    stops = []

    def work():
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA GPU here; train with --device cpu (the default).")
        ranks, device = join_ranks(args.device)  # under torchrun: this rank's place (and GPU); else one process
        with as_one_of(ranks):
            recipe = load_recipe(args.config, args.corpus)
            stops.append(train(recipe, args.out, args.resume, args.stop_after, not args.no_progress, args.threads,
                               ranks, device))
            say(report(stops[0], args))  # after SIGHUP there may be no terminal left to say it on

    code = run_tool(work, f"interrupted at once; if {args.out / STATE_FILE} exists it holds the last saved step "
                          f"(resume: {resume_command(args)})")
    if code == 0 and stops[0].reason == "interrupted":  # 128 + the signal: 130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP
        return 128 + signal.Signals[stops[0].signal].value
    return code


if __name__ == "__main__":
    sys.exit(main())
