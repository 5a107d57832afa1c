"""Time to first token from a cold process: this project's run.py against llama.cpp's llama-completion.

    python -m bench.first_token                 # 1B shape, 3 repetitions, 2 threads
    python -m bench.first_token --shape 8b --reps 2

What a user waits for when they start a completion: a new process that loads the model, reads the prompt (the
42 prompt: 17 tokens with <|begin_of_text|>), writes one token and exits. Ours: `python run.py --ckpt-dir DIR
--max-new-tokens 1 --temperature 0 PROMPT` on the bench's random checkpoint (bf16, computed as `--dtype auto`
chooses) and on its saved int8 / int4 folders (bench/out/ckpt-SHAPE-int8, -int4); llama.cpp's: `llama-completion
-m FILE -p PROMPT -n 1 -no-cnv -c 256 --temp 0` on the GGUF files of the same checkpoint (BF16, Q8_0, Q4_0,
Q4_K_M; bench/llamacpp.py writes them), with its default warm-up run. Each width's pair runs back to back,
repetition by repetition. Before every run its files are read (up to three times) until the page cache holds
them, so that both start warm: the time is the process's own (interpreter or binary start, load, prompt, one
token, exit), not the disk's; the fraction cached is kept with each run.
Peak RSS comes from wait4, as for llama-bench. The "ours-gguf-*" rows are run.py on llama.cpp's own GGUF files
(bench/gguf_rows.py), each right after llama.cpp on the same file: the Q4_0 file straight into int4, against it
dequantized and quantized again, and against the BF16 file quantized at load.
Output: bench/out/first-token-SHAPE.{md,json}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import gguf_rows, llamacpp
from bench.__main__ import NAMES, REPO, QUANTIZED, require_packages, write_quantized_checkpoint, write_random_checkpoint
from llama3_raw.checkpoints.defaults import FORTY_TWO_PROMPT
from llama3_raw.checkpoints.meta import cached_fraction, warm_page_cache

PROMPT = FORTY_TWO_PROMPT
ORDER = ["ours", "llamacpp-bf16", "ours-gguf-bf16", "ours-gguf-bf16-int4", "ours-int8", "llamacpp-q8_0",
         "ours-gguf-int8", "ours-int4", "llamacpp-q4_0", "ours-gguf-int4", "ours-gguf-int4-requantize",
         "llamacpp-q4_k_m", "ours-int4-g64"]  # each width's pair back to back, and ours on llama.cpp's file after it
GGUF_WAYS = gguf_rows.ALL_WAYS
NAMES = {**NAMES, **gguf_rows.IMPL_NAMES}


def warm(paths: list[Path], attempts: int = 3) -> float:
    """Read the files until the page cache holds them (at most `attempts` times: an 8B bf16 file read once after
    the other implementation's was only partly cached, its pages evicted before the other's, which had been read
    twice); the fraction of their bytes cached in the end. Each pass is the loader's own (it skips a file that is
    all cached already)."""
    for _ in range(attempts):
        for path in paths:
            warm_page_cache(path, show_progress=False)
        sizes = [path.stat().st_size for path in paths]
        cached = sum(cached_fraction(path) * size for path, size in zip(paths, sizes)) / max(sum(sizes), 1)
        if cached >= 0.99:
            break
    return cached


def command(impl: str, model: Path, threads: int) -> list[str]:
    if impl in llamacpp.WIDTHS:
        return [str(llamacpp.BIN / "llama-completion"), "-m", str(model), "-p", PROMPT, "-n", "1", "-no-cnv",
                "-c", "256", "--temp", "0", "-t", str(threads)]
    flags = gguf_rows.run_flags(impl) if impl in GGUF_WAYS else []
    return [sys.executable, str(REPO / "run.py"), "--ckpt-dir", str(model), "--max-new-tokens", "1",
            "--temperature", "0", "--threads", str(threads), *flags, PROMPT]


def timed_run(impl: str, model: Path, threads: int) -> dict:
    """One cold process: seconds from its start to its exit after one token, and its peak RSS."""
    files = [model] if model.is_file() else sorted(p for p in model.iterdir() if p.is_file())
    cached = warm(files)
    launcher = [sys.executable, "-S", "-c", llamacpp.LAUNCHER, *command(impl, model, threads)]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    result = subprocess.run(launcher, capture_output=True, text=True, cwd=REPO, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{result.stderr[-3000:]}\nerror: {impl} on {model} failed (exit {result.returncode}).")
    return {"impl": impl, "seconds": seconds, "peak_rss_bytes": llamacpp.parse_peak_rss(result.stderr),
            "file_bytes": sum(p.stat().st_size for p in files), "cached_before": cached, "stdout_tail": result.stdout[-200:]}


def table(runs: dict[str, list[dict]], args) -> str:
    lines = [f"Time to first token from a cold process (warm page cache), {args.shape} shape, {args.threads} threads, "
             f"median (min–max) of {args.reps} runs", "",
             "| implementation | files GB | first token s | peak RSS GB |", "|---|---|---|---|"]
    for impl in (i for i in ORDER if i in runs):
        seconds = [r["seconds"] for r in runs[impl]]
        rss = [r["peak_rss_bytes"] / 1e9 for r in runs[impl]]
        lines.append(f"| {NAMES[impl]} | {runs[impl][0]['file_bytes'] / 1e9:.2f} | {statistics.median(seconds):.2f} "
                     f"({min(seconds):.2f}–{max(seconds):.2f}) | {statistics.median(rss):.2f} |")
    same_file = [(ours, GGUF_WAYS[ours][0]) for ours in GGUF_WAYS]
    pairs = [(ours, theirs) for ours, _, theirs in llamacpp.PAIRS] + same_file + [
        ("ours-gguf-int4", "ours-gguf-int4-requantize"), ("ours-gguf-int4", "ours-gguf-bf16-int4")]
    pairs = [(ours, theirs) for ours, theirs in pairs if ours in runs and theirs in runs]
    if pairs:
        lines += ["", "| pair | first token, first / second (median of each repetition's ratio) |", "|---|---|"]
        for ours, theirs in pairs:
            ratio = statistics.median(a["seconds"] / b["seconds"] for a, b in zip(runs[ours], runs[theirs]))
            lines.append(f"| {NAMES[ours]} vs {NAMES[theirs]} | {ratio:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.first_token", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=ORDER, choices=ORDER)
    args = parser.parse_args()
    out = REPO / "bench" / "out"
    ckpt = out / f"ckpt-{args.shape}"
    require_packages(["ours"], ckpt)
    if any(impl in llamacpp.WIDTHS or impl in GGUF_WAYS for impl in args.impls):
        llamacpp.require_build()
    write_random_checkpoint(ckpt, args.shape)
    models = {"ours": ckpt}
    for impl in (i for i in args.impls if i in QUANTIZED):
        models[impl] = write_quantized_checkpoint(ckpt, *QUANTIZED[impl])[0]
    if any(impl in llamacpp.WIDTHS or impl in GGUF_WAYS for impl in args.impls):
        ggufs = llamacpp.write_ggufs(ckpt, args.threads)
        models.update(ggufs)
        models.update({impl: gguf_rows.gguf_file(impl, ggufs) for impl in GGUF_WAYS})
    runs: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        for impl in (i for i in ORDER if i in args.impls):
            runs.setdefault(impl, []).append(timed_run(impl, models[impl], args.threads))
            print(f"rep {rep + 1}: {NAMES[impl]} {runs[impl][-1]['seconds']:.2f} s, peak RSS "
                  f"{runs[impl][-1]['peak_rss_bytes'] / 1e9:.2f} GB, {runs[impl][-1]['cached_before']:.0%} of the "
                  f"files cached before", file=sys.stderr)
    text = table(runs, args)
    (out / f"first-token-{args.shape}.md").write_text(text)
    (out / f"first-token-{args.shape}.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
