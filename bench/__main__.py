"""Benchmark: this project, Meta's reference and Hugging Face's LlamaForCausalLM on one random checkpoint.

    python -m bench                          # Llama 3.2 1B shape (2.5 GB bf16 file), fp32 and bf16, 3 reps
    python -m bench --shape 8b --dtypes bfloat16 --impls ours --reps 1   # Llama 3 8B shape (16 GB file)

Writes (or reuses) a random-weight checkpoint in Meta's format under bench/out/, measures this machine's
memory read bandwidth, then runs every (implementation, dtype) in its own process (bench/worker.py),
repetition by repetition so that noise from a shared machine spreads over all of them. Reports the
median and range of load seconds, peak RSS against the file size, prefill tokens/s for a 17- and a
512-token prompt, decode tokens/s over 32 steps, and decode's fraction of the bandwidth ceiling
(bandwidth / bytes of weights read per token): against the bandwidth each worker reads right after its
own decode (the VM's bandwidth drifts by 2x within a minute), and against the highest reading of the
run. "ours-int8" and "ours-int4" run the weights saved as `run.py --quantize int8|int4 --save-quantized`
saves them (bench/out/ckpt-SHAPE-int8, -int4, written once). "llamacpp" (optional: `python -m bench.llamacpp
setup` builds it) adds llama.cpp's llama-bench on BF16, Q8_0 and Q4_0 GGUF conversions of the same
checkpoint, each right after ours of the same width, and a table of ratios ours / llama.cpp (bench/llamacpp.py);
"gguf" adds this project reading those very files, each right after llama.cpp on it (bench/gguf_rows.py).
Output: bench/out/bench-SHAPE.{md,json,png}.
"""

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import gguf_rows, llamacpp
from bench.worker import read_bandwidth
from llama3_raw.events import run_tool
from llama3_raw.files import write_png, write_text
from llama3_raw.params import params_from_dict

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # Meta's params.json for Llama 3.2 1B and Llama 3 8B.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
}
TIED = {"1b": True, "8b": False}  # Llama 3.2 1B ships without output.weight
IMPL_NAMES = {"ours": "llama3_raw", "ours-int8": "llama3_raw int8", "ours-int4": "llama3_raw int4",
              "ours-int4-g64": "llama3_raw int4 g64", "meta": "Meta reference", "hf": "HF transformers"}
# The saved int8 / int4 folders the quantized implementations load: (scheme, int4 group size or None for the default)
QUANTIZED = {"ours-int8": ("int8", None), "ours-int4": ("int4", None), "ours-int4-g64": ("int4", 64)}
NAMES = {**IMPL_NAMES, **llamacpp.IMPL_NAMES, **gguf_rows.IMPL_NAMES}  # "--impls llamacpp" / "gguf" add rows
FILL_ROWS = 4096  # random rows generated at a time while writing a checkpoint


TEST_INSTALL = "pip install -r requirements-test.txt && pip install --no-deps llama-models"


def missing_requirements(impls: list[str], checkpoint_written: bool) -> list[str]:
    """The test-only packages that this run needs and cannot import: llama_models for the official tokenizer
    file of a checkpoint still to write and, with fairscale, for Meta's reference ("meta"); transformers for "hf"."""
    needed = (["llama_models"] if "meta" in impls or not checkpoint_written else []) + \
        (["fairscale"] if "meta" in impls else []) + (["transformers"] if "hf" in impls else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_packages(impls: list[str], ckpt: Path) -> None:
    """Stop in one sentence, before any slow work, when a package this run needs is not installed."""
    missing = missing_requirements(impls, (ckpt / "consolidated.00.pth").is_file())
    if missing:
        print(f"error: this benchmark needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
              f"installed; run {TEST_INSTALL} first.", file=sys.stderr)
        raise SystemExit(2)


def write_random_checkpoint(folder: Path, shape: str) -> Path:
    """A checkpoint of Meta's layout with random bf16 weights (scaled like an initialised model).

    Each tensor lives in its own file-backed scratch mapping while it is filled, so writing the 16 GB
    8B shape needs disk, not memory; torch.save then streams them into consolidated.00.pth.
    """
    if (folder / "consolidated.00.pth").is_file():
        return folder
    import llama_models.llama3 as meta_llama3  # bench-only: the official tokenizer file

    scratch = folder / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    params = params_from_dict(SHAPES[shape])
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, dims in params.weight_shapes().items():
        if key == "output.weight" and TIED[shape]:
            continue
        tensor = torch.from_file(str(scratch / key), shared=True, size=math.prod(dims), dtype=torch.bfloat16).view(dims)
        if len(dims) == 1:
            tensor.copy_(1.0 + 0.1 * torch.randn(dims, generator=generator))
        else:
            for start in range(0, dims[0], FILL_ROWS):
                rows = tensor[start:start + FILL_ROWS]
                rows.copy_(torch.randn(rows.shape, generator=generator) * dims[1] ** -0.5)
        state[key] = tensor
    tmp = folder / "consolidated.00.pth.tmp"
    torch.save(state, tmp)
    tmp.rename(folder / "consolidated.00.pth")
    del state
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    (folder / "params.json").write_text(json.dumps(SHAPES[shape]))
    (folder / "tokenizer.model").write_bytes((Path(meta_llama3.__file__).parent / "tokenizer.model").read_bytes())
    return folder


def write_quantized_checkpoint(ckpt: Path, scheme: str, group_size: int | None = None) -> tuple[Path, float | None]:
    """The checkpoint's int8 or int4 weights saved as run.py saves them (`--quantize SCHEME [--group-size G]
    --save-quantized`; int4 in its default groups when `group_size` is None), once.

    "ours int8" / "ours int4" load these files, as a user with a 24 GiB machine would for the 8B shape:
    quantizing at load maps the 16 GB bf16 file and builds the quantized copy beside it. Returns (folder,
    seconds to quantize and save, or None when the folder was already there).
    """
    from llama3_raw.checkpoints import default_tokenizer_path, load_checkpoint
    from llama3_raw.checkpoints.quantized import QUANTIZED_FILES, save_quantized_checkpoint
    from llama3_raw.quantize import INT4_GROUP_SIZE, quantize_weights

    suffix = f"-g{group_size}" if group_size is not None else ""
    folder = ckpt.with_name(f"{ckpt.name}-{scheme}{suffix}")
    if (folder / QUANTIZED_FILES[scheme]).is_file():
        return folder, None
    start = time.perf_counter()
    checkpoint = load_checkpoint(ckpt, show_progress=False)
    weights = quantize_weights(checkpoint.weights, torch.bfloat16, scheme, group_size or INT4_GROUP_SIZE)
    save_quantized_checkpoint(weights, checkpoint.params, scheme, default_tokenizer_path(ckpt), folder)
    return folder, time.perf_counter() - start


def run_worker(impl: str, dtype: str, ckpt: Path, threads: int, args) -> dict:
    command = [sys.executable, "-m", "bench.worker", "--impl", impl, "--dtype", dtype, "--ckpt", str(ckpt),
               "--threads", str(threads), "--long-prompt", str(args.long_prompt),
               "--decode-steps", str(args.decode_steps)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{impl} {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def impl_runs(impl: str, dtype: str, args, ckpt: Path, quantized_ckpts: dict[str, Path], ggufs: dict):
    """One repetition's run of an implementation at a dtype: a worker, or one llama-bench on a GGUF file."""
    if (impl in quantized_ckpts or impl in gguf_rows.GGUF_IMPLS) and dtype != "bfloat16":
        return []  # int8 / int4 weights with bf16 activations; a GGUF's bf16 as it is
    if impl in gguf_rows.GGUF_IMPLS:
        return [run_worker(impl, dtype, gguf_rows.gguf_file(impl, ggufs), args.threads, args)]
    if impl in llamacpp.WIDTHS:
        return [llamacpp.run_llama_bench(impl, ggufs[impl], args.threads, params_from_dict(SHAPES[args.shape]))]
    return [run_worker(impl, dtype, quantized_ckpts.get(impl, ckpt), args.threads, args)]


def rep_order(impls: list[str], dtype: str, first_dtype: str) -> list[str]:
    """One repetition's runs at a dtype, in order. "llamacpp" stands for its GGUF runs, at the first dtype
    only (its weights have their own types), each right after ours of the same width (llamacpp.PAIRS), and a
    second of ours of that width (int4 in groups of 64) right after it: the machine's bandwidth drifts by 2x
    within minutes, and runs back to back meet nearly the same. This project on llama.cpp's GGUF files comes
    right after llama.cpp on the same file (gguf_rows.place_after_llamacpp)."""
    own = [impl for impl in impls if impl != "gguf" and impl not in gguf_rows.GGUF_IMPLS]
    return gguf_rows.place_after_llamacpp(llamacpp_order(own, dtype, first_dtype), impls)


def llamacpp_order(impls: list[str], dtype: str, first_dtype: str) -> list[str]:
    if "llamacpp" not in impls or dtype != first_dtype:
        return [impl for impl in impls if impl != "llamacpp"]
    order = []
    for impl in impls:
        if impl == "llamacpp" or impl in order:
            continue
        order.append(impl)
        theirs = next((t for ours, _, t in llamacpp.PAIRS if ours == impl and t not in order), None)
        if theirs:
            order.append(theirs)
            order += [ours for ours, _, t in llamacpp.PAIRS if t == theirs and ours in impls and ours not in order]
            order += [t for ours, _, t in llamacpp.PAIRS if ours == impl and t not in order]  # Q4_K_M after Q4_0
    return order + [impl for impl in llamacpp.WIDTHS if impl not in order]


def summary(values: list[float]) -> dict | None:
    if None in values:  # not measured (llama-bench reports no load time)
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict], bandwidth: float) -> dict:
    """Medians and ranges over the repetitions of one (implementation, dtype).

    Two ceilings: one from the run's overall bandwidth (the highest of all readings: before and after all
    runs and each worker's), and each run's own, from the bandwidth read right after its decode; "of
    ceiling" divides each run's decode speed by its own ceiling and takes the median.
    """
    first = runs[0]
    ceiling = bandwidth / first["bytes_per_token"]  # tokens/s if decode did nothing but read the weights
    decode = summary([r["decode_tok_s"] for r in runs])
    adjacent = [r for r in runs if r.get("bandwidth_after_decode")]
    fractions = [r["decode_tok_s"] * r["bytes_per_token"] / r["bandwidth_after_decode"] for r in adjacent]
    return {
        "impl": first["impl"], "dtype": first["dtype"], "reps": len(runs),
        "load_s": summary([r["load_s"] for r in runs]),
        "peak_rss_gb": summary([r["peak_rss_bytes"] / 1e9 for r in runs]),
        "baseline_rss_gb": summary([r.get("baseline_rss_bytes", 0) / 1e9 for r in runs]),
        "file_gb": first["file_bytes"] / 1e9, "kv_cache_gb": first["kv_cache_bytes"] / 1e9,
        "prefill_short_tok_s": summary([r["prefill_short_tok_s"] for r in runs]),
        "prefill_long_tok_s": summary([r["prefill_long_tok_s"] for r in runs]),
        "decode_tok_s": decode, "decode_tok_s_by_rep": [r["decode_tok_s"] for r in runs],
        "bandwidth_by_rep": [r.get("bandwidth_after_decode") for r in runs],
        "bytes_per_token": first["bytes_per_token"],
        "ceiling_tok_s": ceiling, "fraction_of_overall_ceiling": decode["median"] / ceiling,
        "bandwidth_after_decode_gb_s": summary([r["bandwidth_after_decode"] / 1e9 for r in adjacent]) if adjacent else None,
        "fraction_of_ceiling": summary(fractions) if fractions else None,
    }


def shape_parameters(shape: str) -> int:
    """Parameters of a shape; a tied output matrix is the embeddings, counted once."""
    shapes = params_from_dict(SHAPES[shape]).weight_shapes()
    return sum(math.prod(dims) for key, dims in shapes.items() if not (key == "output.weight" and TIED[shape]))


def cell(s: dict | None, fmt: str) -> str:
    if s is None:
        return "–"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown_table(rows: list[dict], args, bandwidth: float, threads: int) -> str:
    lines = [
        f"Random-weight Llama 3 {args.shape.upper()} shape, {shape_parameters(args.shape) / 1e9:.2f} B parameters; "
        f"{threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s (highest reading); median (min–max) of "
        f"{args.reps} runs, each in its own process",
        "",
        f"| implementation | dtype | file GB | load s | peak RSS GB | prefill tok/s ({args.short_prompt} tok) | "
        f"prefill tok/s ({args.long_prompt} tok) | decode tok/s ({args.decode_steps} steps) | "
        f"read GB/s after decode | of that ceiling | of highest ceiling ({bandwidth / 1e9:.0f} GB/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        adjacent = (f"{cell(r['bandwidth_after_decode_gb_s'], '.1f')} | {percent_cell(r['fraction_of_ceiling'])}"
                    if r["fraction_of_ceiling"] else "– | –")
        lines.append(
            f"| {NAMES[r['impl']]} | {r['dtype']} | {r['file_gb']:.2f} | {cell(r['load_s'], '.1f')} | {cell(r['peak_rss_gb'], '.2f')} | "
            f"{cell(r['prefill_short_tok_s'], '.1f')} | {cell(r['prefill_long_tok_s'], '.1f')} | "
            f"{cell(r['decode_tok_s'], '.2f')} | {adjacent} | {r['fraction_of_overall_ceiling']:.0%} "
            f"(ceiling {r['ceiling_tok_s']:.2f} tok/s) |")
    return "\n".join(lines)


def percent_cell(s: dict) -> str:
    return f"{s['median']:.0%} ({s['min']:.0%}–{s['max']:.0%})"


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    short_names = {"ours": "ours", "ours-int8": "ours int8", "ours-int4": "ours int4", "ours-int4-g64": "ours int4\ng64",
                   "meta": "Meta", "hf": "HF",
                   **llamacpp.SHORT_NAMES, **gguf_rows.SHORT_NAMES}
    labels = [f"{short_names[r['impl']]}\n{r['dtype'].replace('bfloat16', 'bf16').replace('float32', 'fp32')}" for r in rows]
    colors = {"ours": "tab:blue", "ours-int8": "tab:cyan", "ours-int4": "tab:purple", "ours-int4-g64": "tab:olive",
              "meta": "tab:orange", "hf": "tab:green",
              **llamacpp.COLORS, **gguf_rows.COLORS}
    for ax, key, name in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_long_tok_s", "prefill tok/s (512 tokens)")):
        medians = [r[key]["median"] for r in rows]
        errors = [[r[key]["median"] - r[key]["min"] for r in rows], [r[key]["max"] - r[key]["median"] for r in rows]]
        ax.bar(range(len(rows)), medians, yerr=errors, capsize=3, color=[colors[r["impl"]] for r in rows])
        if key == "decode_tok_s":  # the bandwidth ceiling of each bar's dtype, as a tick above it
            ax.scatter(range(len(rows)), [r["ceiling_tok_s"] for r in rows], marker="_", s=600, color="black",
                       label="bandwidth ceiling", zorder=3)
            ax.set_ylim(top=1.25 * max(r["ceiling_tok_s"] for r in rows))  # room for the legend above every tick
            ax.legend(loc="upper left")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--impls", nargs="+", default=["ours", "meta", "hf", "ours-int8", "ours-int4"],
                        choices=[*IMPL_NAMES, "llamacpp", "gguf", *gguf_rows.GGUF_IMPLS])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for every run (default: all cores)")
    parser.add_argument("--short-prompt", type=int, default=17, help=argparse.SUPPRESS)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    if args.reps < 1 or args.threads < 1 or args.long_prompt < 2 or args.decode_steps < 1:
        print("error: --reps, --threads and --decode-steps must be at least 1 and --long-prompt at least 2.", file=sys.stderr)
        raise SystemExit(2)
    require_packages(args.impls, args.out / f"ckpt-{args.shape}")
    wants_ggufs = "llamacpp" in args.impls or "gguf" in args.impls or bool(set(args.impls) & set(gguf_rows.GGUF_IMPLS))
    if wants_ggufs:  # llama.cpp's converter and llama-quantize write the files
        llamacpp.require_build()

    t0 = time.perf_counter()
    ckpt = write_random_checkpoint(args.out / f"ckpt-{args.shape}", args.shape)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    quantized_ckpts, quantize_s = {}, {}
    for impl, (scheme, group_size) in QUANTIZED.items():
        if impl in args.impls and "bfloat16" in args.dtypes:
            quantized_ckpts[impl], quantize_s[impl] = write_quantized_checkpoint(ckpt, scheme, group_size)
            print(f"{impl} checkpoint {quantized_ckpts[impl]} ready" +
                  (f", quantized and saved in {quantize_s[impl]:.0f}s" if quantize_s[impl] else ""), file=sys.stderr)
    ggufs = llamacpp.write_ggufs(ckpt, args.threads) if wants_ggufs else {}
    bandwidths = [read_bandwidth(args.threads)]
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.reps):
        for dtype in args.dtypes:
            for impl in rep_order(args.impls, dtype, args.dtypes[0]):
                for result in impl_runs(impl, dtype, args, ckpt, quantized_ckpts, ggufs):
                    runs.setdefault((result["impl"], result["dtype"]), []).append(result)
                    print(f"rep {rep + 1}: {result['impl']} {result['dtype']}: decode {result['decode_tok_s']:.2f} tok/s, prefill "
                          f"{result['prefill_long_tok_s']:.1f} tok/s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB "
                          f"[{time.perf_counter() - t0:.0f}s]", file=sys.stderr)
    bandwidths.append(read_bandwidth(args.threads))  # before and after, and each worker's after its decode:
    bandwidths += [r["bandwidth_after_decode"] for group in runs.values() for r in group if r["bandwidth_after_decode"]]
    bandwidth = max(bandwidths)  # the highest reading sets the run's overall ceiling

    rows = [summarise(r, bandwidth) for r in runs.values()]
    markdown = markdown_table(rows, args, bandwidth, args.threads) + llamacpp.ratio_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"bench-{args.shape}.md", markdown + "\n")
    write_text(args.out / f"bench-{args.shape}.json", json.dumps(
        {"shape": args.shape, "threads": args.threads, "bandwidth_bytes_per_s": bandwidths, "quantize_s": quantize_s,
         "rows": rows,
         "runs": [run for group in runs.values() for run in group]}, indent=1))
    bar_chart(rows, args.out / f"bench-{args.shape}.png",
              f"Llama 3 {args.shape.upper()} shape, {args.threads} CPU thread{'s' if args.threads > 1 else ''}, "
              f"median and range of {args.reps} runs")
    print(markdown)
    print(f"total {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_tool(main))  # Ctrl-C, SIGTERM, a closed stdout: one line (or none), as every command of the project
