"""How many CPU threads a model of each size wants: the measurements behind llama3_raw/threads.py's default.

    python -m bench.threads             # shipped 5M model and random 30M / 160M models, 1 vs 2 threads (5 reps)

For each model: a 256-token forward (prefill) and 32 decode steps through the KV cache, in float32,
repetitions alternating between thread counts so that noise from a shared machine spreads over all.
Prints the median seconds (prefill) and tokens/s (decode) per thread count.
"""

import argparse
import statistics
import time

import torch

from llama3_raw.checkpoints import open_model
from llama3_raw.generate import Sampling, generate
from llama3_raw.params import params_from_dict

RANDOM_SHAPES = {  # (name, params.json fields): a middle and a bigger model than the shipped one
    "random 30M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=64, norm_eps=1e-5, rope_theta=500000.0),
    "random 160M": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=32000, multiple_of=256, norm_eps=1e-5, rope_theta=500000.0),
}


def random_weights(fields: dict):
    params = params_from_dict(fields)
    generator = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(shape, generator=generator) * (shape[-1] ** -0.5)
               for key, shape in params.weight_shapes().items()}
    return weights, params


def time_one(weights, params, threads: int) -> tuple[float, float]:
    """(prefill seconds for 256 tokens, decode tokens/s over 32 steps) with `threads` threads."""
    torch.set_num_threads(threads)
    prompt = torch.randint(0, params.vocab_size, (256,), generator=torch.Generator().manual_seed(1)).tolist()
    start = time.perf_counter()
    tokens = generate(weights, params, prompt, 33, set(), Sampling(), torch.float32, "cpu")
    next(tokens)
    after_prefill = time.perf_counter()
    count = sum(1 for _ in tokens)
    return after_prefill - start, count / (time.perf_counter() - after_prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, e.g. 1,2,4")
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    shipped = open_model(None, show_progress=False)
    models = {"shipped 5M": (shipped.weights, shipped.params)}
    models |= {name: random_weights(fields) for name, fields in RANDOM_SHAPES.items()}
    for name, (weights, params) in models.items():
        runs = {n: [] for n in counts}
        for _ in range(args.reps):
            for n in counts:
                runs[n].append(time_one(weights, params, n))
        for n in counts:
            prefill = statistics.median(r[0] for r in runs[n])
            decode = statistics.median(r[1] for r in runs[n])
            print(f"{name} ({params.parameter_count() / 1e6:.0f}M): {n} thread(s): 256-token forward "
                  f"{prefill:.3f} s, decode {decode:.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
