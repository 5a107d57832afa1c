"""How many CPU threads a model of each size wants: the measurements behind llama3_raw/threads.py's default.

    python -m bench.threads             # shipped 5M model and random 30M / 160M models, 1 vs 2 threads (5 reps)
    python -m bench.threads --default-vs 2          # run.py's default thread count against --threads 2, 1B shape
    python -m bench.threads --default-vs 2 --busy   # the same while another process keeps one core busy

For each model: a 256-token forward (prefill) and 32 decode steps through the KV cache, in float32,
repetitions alternating between thread counts so that noise from a shared machine spreads over all.
Prints the median seconds (prefill) and tokens/s (decode) per thread count.

--default-vs N runs `python run.py --json` on the bench's random Llama 3.2 1B-shape checkpoint (bench/out/ckpt-1b,
bf16, as `python -m bench` writes it) without --threads and with --threads N, back to back, alternating which goes
first. Before each run, --heavy-s seconds of work on every core (what Meta's reference decode, or this project's
previous run, leaves behind in the load average) ends; the run then starts on idle cores. Each line says the
threads the default chose, the decode tok/s, the cores other work kept busy over the 0.5 s before the run, and
the load average at the start: what the old rule (cores minus the load average) would have subtracted. --busy keeps one core busy with another process during the runs
(a shared machine), where the default should take fewer threads. Output: bench/out/threads-default-SHAPE.json.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama3_raw.checkpoints import open_model
from llama3_raw.events import run_tool
from llama3_raw.files import write_json
from llama3_raw.generate import Sampling, generate
from llama3_raw.params import params_from_dict
from llama3_raw.threads import busy_cores, usable_cores

REPO = Path(__file__).resolve().parent.parent

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


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def heavy_work(seconds: float) -> None:
    """Every usable core busy for `seconds` (one spinning process each), all ended when this returns."""
    if seconds <= 0:
        return
    workers = [multiprocessing.Process(target=spin, args=(seconds,)) for _ in range(usable_cores())]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def timed_run(ckpt: Path, threads: int | None, new_tokens: int) -> dict:
    """One `python run.py --json` on `ckpt`, greedy; its stats with the load average at its start."""
    load = os.getloadavg()[0]
    busy = busy_cores(0.5)  # what other work does as the run starts: the machine is shared
    command = [sys.executable, str(REPO / "run.py"), "ROMEO:", "--ckpt-dir", str(ckpt), "--dtype", "bfloat16", "--json",
               "--temperature", "0", "--max-new-tokens", str(new_tokens),
               *(["--threads", str(threads)] if threads is not None else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {result.stderr.strip().splitlines()[-1:]}")
    stats = json.loads(result.stdout.strip().splitlines()[-1])["stats"]
    cores = usable_cores()
    return {"threads_flag": threads, "threads": stats["threads"], "decode_tok_per_s": stats["decode_tok_per_s"],
            "loadavg_1min": round(load, 2), "old_rule_threads": max(1, cores - round(load)), "cores": cores,
            "busy_cores_at_start": round(busy, 2)}


def default_vs_fixed(args: argparse.Namespace) -> None:
    """run.py's default thread count against --threads N, back to back (see the module's docstring)."""
    from bench.__main__ import write_random_checkpoint

    ckpt = write_random_checkpoint(args.out / f"ckpt-{args.shape}", args.shape)
    busy = multiprocessing.Process(target=spin, args=(86400,)) if args.busy else None
    if busy:
        busy.start()
    runs = []
    try:
        for rep in range(args.reps):
            order = [None, args.default_vs] if rep % 2 == 0 else [args.default_vs, None]
            for threads in order:
                heavy_work(args.heavy_s)
                run = timed_run(ckpt, threads, args.new_tokens)
                runs.append(run)
                label = "default" if threads is None else f"--threads {threads}"
                print(f"rep {rep + 1}: {label}: {run['threads']} thread(s), {run['decode_tok_per_s']:.2f} tok/s "
                      f"({run['busy_cores_at_start']:.2f} cores busy with other work at the start; load average "
                      f"{run['loadavg_1min']:.2f}: the old rule would take {run['old_rule_threads']})", flush=True)
    finally:
        if busy:
            busy.terminate()
            busy.join()
    summary = {}
    for threads in (None, args.default_vs):
        mine = [r for r in runs if r["threads_flag"] == threads]
        summary["default" if threads is None else f"threads_{threads}"] = {
            "median_tok_per_s": statistics.median(r["decode_tok_per_s"] for r in mine),
            "threads_chosen": sorted({r["threads"] for r in mine})}
    ratio = summary["default"]["median_tok_per_s"] / summary[f"threads_{args.default_vs}"]["median_tok_per_s"]
    print(f"{args.shape} bf16, {args.new_tokens} new tokens, {args.reps} reps, after {args.heavy_s:g} s of heavy work"
          f"{', one core kept busy' if args.busy else ''}: default {summary['default']['median_tok_per_s']:.2f} tok/s "
          f"({'/'.join(map(str, summary['default']['threads_chosen']))} threads), --threads {args.default_vs} "
          f"{summary[f'threads_{args.default_vs}']['median_tok_per_s']:.2f} tok/s; default / fixed = {ratio:.2f}",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"threads-default-{args.shape}{'-busy' if args.busy else ''}.json",
               {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary, "ratio": ratio})


def model_sweep(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.threads.split(",")]
    shipped = open_model(None, show_progress=False)
    models = {"shipped 5M": (shipped.weights, shipped.params)}
    models |= {name: random_weights(fields) for name, fields in RANDOM_SHAPES.items()}
    for name, (weights, params) in models.items():
        if args.models and not any(name.startswith(m) for m in args.models):
            continue
        runs = {n: [] for n in counts}
        for _ in range(args.reps):
            for n in counts:
                runs[n].append(time_one(weights, params, n))
        for n in counts:
            prefill = statistics.median(r[0] for r in runs[n])
            decode = statistics.median(r[1] for r in runs[n])
            print(f"{name} ({params.parameter_count() / 1e6:.0f}M): {n} thread(s): 256-token forward "
                  f"{prefill:.3f} s, decode {decode:.0f} tok/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="thread counts to compare, e.g. 1,2,4")
    parser.add_argument("--models", nargs="+", choices=["shipped", "random"], help="only these models (default all)")
    parser.add_argument("--default-vs", type=int, metavar="N", help="run.py's default threads against --threads N")
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b", help="--default-vs: the checkpoint's shape")
    parser.add_argument("--heavy-s", type=float, default=30, help="--default-vs: seconds of work on every core "
                        "before each run (default 30)")
    parser.add_argument("--busy", action="store_true", help="--default-vs: one core kept busy during the runs")
    parser.add_argument("--new-tokens", type=int, default=32, help="--default-vs: tokens per run (default 32)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    return run_tool(lambda: default_vs_fixed(args) if args.default_vs else model_sweep(args))


if __name__ == "__main__":
    sys.exit(main())
