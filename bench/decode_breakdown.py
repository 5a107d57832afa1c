"""Where a decode step's time goes, measured in one process so that the machine's drifting bandwidth is shared.

    python -m bench.decode_breakdown [--ckpt bench/out/ckpt-1b] [--dtype bfloat16] [--rounds 8] [--context 17]

Each round times, back to back: a read of a 512 MiB float32 tensor (`sum`, the bandwidth probe the bench
uses), the matrix products of one decode step alone (every weight matrix times one activation row, in the
checkpoint's order and through the model's own `matmul`), and one whole `forward` step. The products' share of
the step is the kernels; the rest is everything else (norms, RoPE, attention, Python). Per-shape read speeds
come from the last round. Prints one JSON object per round, then a summary.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.worker import DTYPES
from llama3_raw.checkpoints import cast_weights, load_checkpoint
from llama3_raw.checkpoints.placement import in_huge_pages
from llama3_raw.fast_forward import forward  # the decode loop's: compiled pieces linked in
from llama3_raw.kernels import matmul
from llama3_raw.model import new_kv_cache
from llama3_raw.quantize import is_quantized_key


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("bench/out/ckpt-1b"))
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--context", type=int, default=17, help="positions already in the cache (the prompt)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    checkpoint = load_checkpoint(args.ckpt, show_progress=False)
    params, weights = checkpoint.params, in_huge_pages(cast_weights(checkpoint.weights, dtype, "cpu"))  # as load_model
    matrices = [w for key, w in weights.items() if is_quantized_key(key)]  # every multiplied matrix, in Meta's order
    rows = {n: torch.randn(1, n).to(dtype) for n in {m.shape[1] for m in matrices}}
    weight_bytes = sum(m.nbytes for m in matrices)
    cache = new_kv_cache(params, 1, args.context + 8, dtype)
    prompt = [128000] + [1000 + i % 5000 for i in range(args.context - 1)]
    _, cache = forward(weights, params, torch.tensor([prompt]), cache, last_only=True)
    token = torch.tensor([[5]])
    probe = torch.ones((512 << 20) // 4)

    def products(times: dict | None = None):
        for m in matrices:
            start = time.perf_counter()
            matmul(rows[m.shape[1]], m)
            if times is not None:
                times.setdefault(tuple(m.shape), []).append(time.perf_counter() - start)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    products()
    forward(weights, params, token, cache, last_only=True)
    rounds = []
    for _ in range(args.rounds):
        sum_s = min(timed(probe.sum) for _ in range(3))
        products_s = timed(products)
        step_s = timed(lambda: forward(weights, params, token, cache, last_only=True))
        rounds.append({"sum_gb_s": probe.nbytes / sum_s / 1e9, "products_ms": products_s * 1e3,
                       "products_gb_s": weight_bytes / products_s / 1e9, "step_ms": step_s * 1e3,
                       "step_gb_s": weight_bytes / step_s / 1e9, "products_share": products_s / step_s})
        print(json.dumps({k: round(v, 3) for k, v in rounds[-1].items()}), flush=True)
    per_shape = {}
    products(per_shape)
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    bytes_per_shape = {tuple(m.shape): m.nbytes for m in matrices}  # int8 / int4 weights: their bytes and scales
    summary["per_shape_gb_s"] = {f"{o}x{i}": round(bytes_per_shape[o, i] / min(t) / 1e9, 1)
                                 for (o, i), t in per_shape.items()}
    summary.update(dtype=args.dtype, threads=args.threads, context=args.context, weight_bytes=weight_bytes)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
