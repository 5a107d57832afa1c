"""Why each piece of Llama 3 is there: Llama 3 and its variants trained alike, then compared.

`python -m llama3_raw.lab [--quick] [--out DIR] [--variants a,b] [--steps N] [--seed S]`

Trains Llama 3 and each variant with one piece taken out (LayerNorm for RMSNorm, no RoPE, a ReLU MLP for
SwiGLU, MHA for GQA, one block, a character tokenizer, no causal mask) with the same data, seed, steps and
training loop, then writes DIR/lab.json (every number), DIR/lab.png (every validation curve in nats per
character) and DIR/lab.md (the table and the samples). docs/lab.md shows the default run's. A thin command line
over llama3_raw/lab/ladder.py.
"""

import signal
import sys
from pathlib import Path

from ..checkpoints.defaults import positive_int, seed, thread_count
from ..errors import ArgumentParser
from ..events import run_tool
from ..training import TrainingStop
from .ladder import LAB_RECIPE, PLOT_FILE, QUICK_RECIPE, RESULTS_FILE, TABLE_FILE, run_lab
from ..training.variants import VARIANTS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m llama3_raw.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small model, few steps (training/recipes/lab_quick.json): minutes, for a first look")
    parser.add_argument("--out", type=Path, help="output folder (default runs/lab, or runs/lab-quick with --quick)")
    parser.add_argument("--variants", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help=f"comma-separated, in this order by default: {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=positive_int, help="training steps of every variant (default: the recipe's)")
    parser.add_argument("--seed", type=seed, help="the seed of every variant (default: the recipe's, 1337)")
    parser.add_argument("--config", type=Path, help="a lab recipe JSON instead of lab.json / lab_quick.json")
    parser.add_argument("--corpus", type=Path, help="text file instead of the recipe's data.corpus")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="CPU threads (default 1: the same numbers on every run, on a shared machine the fastest)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path("runs") / ("lab-quick" if args.quick else "lab")
    recipe = args.config or (QUICK_RECIPE if args.quick else LAB_RECIPE)

    labs = []

    def work():
        lab = run_lab(out, recipe, args.variants, args.steps, args.seed, args.corpus, args.threads,
                      not args.no_progress)
        labs.append(lab)
        if isinstance(lab, TrainingStop):
            return  # Ctrl-C, SIGTERM or SIGHUP: the run's state is saved, and run_lab said how to go on
        width = max(len(r["name"]) for r in lab["variants"])
        for r in lab["variants"]:
            print(f"{r['name']:<{width}}  {r['val_nats_per_char']:.4f} nats/char  {r['parameters']:>10,} parameters"
                  f"  {r['kv_cache_bytes_per_token']:>7,} KV bytes/token")
        print(f"wrote {out / RESULTS_FILE}, {out / PLOT_FILE}, {out / TABLE_FILE}", file=sys.stderr)

    code = run_tool(work, f"interrupted; run the same command again to go on where it stopped ({out})")
    if code == 0 and isinstance(labs[0], TrainingStop):  # 128 + the signal: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        return 128 + signal.Signals[labs[0].signal].value
    return code


if __name__ == "__main__":
    sys.exit(main())
