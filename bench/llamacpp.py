"""llama.cpp in the benchmark: `python -m bench --impls ours llamacpp` adds rows "llama.cpp BF16", "Q8_0", "Q4_0" and
"Q4_K_M" (the recipe most users download).

    python -m bench.llamacpp setup   # once: download llama-cpp-python 0.3.36's sdist and build llama-bench,
                                     # llama-quantize and llama-completion from its vendored llama.cpp (cmake and a
                                     # C++ compiler needed: `pip install cmake`, the distro's g++; 3-5 min on 2 cores)
    python -m bench.llamacpp check   # the GGUF files (python -m bench writes them too) against the checkpoint

The sdist and build go to bench/out/llamacpp/, the GGUFs to bench/out/ckpt-SHAPE-gguf/, each written once: the
bench's random checkpoint as a Hugging Face folder (config.json, model.safetensors in Hugging Face's q/k row
order, a tokenizer.json of Meta's tokenizer that llama.cpp's converter recognises as "llama-bpe"; deleted after),
converted by llama.cpp's convert_hf_to_gguf.py to BF16, then by llama-quantize to Q8_0, Q4_0 and Q4_K_M (its default
recipes: Q4_0 keeps a tied embedding/output matrix, as in the 1B shape, in Q6_K; Q4_K_M is Q4_K with attn_v and
ffn_down in Q6_K in half the layers).

Each (width, repetition) is one `llama-bench -m FILE -p 512 -n 64 -t THREADS -r 1 -o json` process in the bench's
repetition loop: prefill tok/s of 512 tokens, decode tok/s of 64 tokens from an empty cache (after llama-bench's
warm-up; no load time, no short prompt), the process's peak RSS (wait4 in a small launcher), the GGUF's size and
the read bandwidth right after it. A decoded token reads every tensor but the embedding table, which is looked
up, unless it is also the output matrix (no output.weight: llama.cpp multiplies by token_embd). llama.cpp's threads
spin at each op's barrier: while another process keeps a core busy, -t ALL CORES collapses (this VM, BF16 decode:
0.6 tok/s with -t 2, 9.8 with -t 1), so compare on a quiet machine. CI never builds llama.cpp; only bench/ imports it.
"""

import argparse
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

from bench import gguf_rows

VERSION = "0.3.36"
OUT = Path(__file__).resolve().parent / "out"
LLAMACPP = OUT / "llamacpp"
SOURCE = LLAMACPP / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
BIN = LLAMACPP / "build" / "bin"
PYDEPS = LLAMACPP / "pydeps"  # the converter's one requirement this project does not have, when not installed
SENTENCEPIECE = "sentencepiece>=0.1.98,<0.3.0"  # as vendor/llama.cpp/requirements/ pins it
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"]
# The CPU's own instruction sets, as GGML_NATIVE=ON would choose them (-march=native), less AMX: on an Intel Xeon VM
# that lists amx_int8 (2026-12-06) ggml's AMX matrix kernel died of SIGILL at its first tile load in llama-bench,
# while decoding never uses AMX (one row at a time). /proc/cpuinfo flag -> ggml's cmake option.
ISA_OPTIONS = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
               "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
               "avx512_bf16": "AVX512_BF16"}
TARGETS = ["llama-bench", "llama-quantize", "llama-completion"]  # llama-completion: time to first token, cold
WIDTHS = {"llamacpp-bf16": "BF16", "llamacpp-q8_0": "Q8_0", "llamacpp-q4_0": "Q4_0",
          "llamacpp-q4_k_m": "Q4_K_M"}  # impl -> llama-quantize's type
IMPL_NAMES = {impl: f"llama.cpp {kind}" for impl, kind in WIDTHS.items()}
SHORT_NAMES = {impl: "llama.cpp" for impl in WIDTHS}
COLORS = {"llamacpp-bf16": "tab:red", "llamacpp-q8_0": "tab:pink", "llamacpp-q4_0": "tab:brown", "llamacpp-q4_k_m": "tab:gray"}
# (ours, width, theirs); int4 in groups of 64 reads 4.5 bits a weight, as Q4_0 does (ours' default groups of 32: 5)
PAIRS = [("ours", "bf16", "llamacpp-bf16"), ("ours-int8", "int8", "llamacpp-q8_0"), ("ours-int4", "int4", "llamacpp-q4_0"),
         ("ours-int4-g64", "int4 g64", "llamacpp-q4_0"), ("ours-int4", "int4", "llamacpp-q4_k_m")]
PROMPT, GENERATE = 512, 64  # llama-bench -p, -n
# Runs a command, reports its peak RSS from wait4: a child of the bench would inherit the bench's across exec.
LAUNCHER = ("import os, sys; pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ); _, status, usage = "
            "os.wait4(pid, 0); code = os.waitstatus_to_exitcode(status); "
            "print(f'peak_rss_kib={usage.ru_maxrss} exit={code}', file=sys.stderr); sys.exit(code & 255)")


def missing_build() -> str | None:
    """One sentence saying how to build llama.cpp when its binaries or source are missing, else None."""
    needed = [*(BIN / target for target in TARGETS), SOURCE / "convert_hf_to_gguf.py"]
    if all(path.is_file() for path in needed) and converter_ready():
        return None
    missing = ", ".join(path.name for path in needed if not path.is_file()) or "the converter's sentencepiece"
    return (f"llama.cpp is not set up in {LLAMACPP} (no {missing}): run `python -m bench.llamacpp setup` first, which "
            f"needs cmake and a C++ compiler (`pip install cmake` and the distro's g++ will do).")


def converter_ready() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None or (PYDEPS / "sentencepiece").is_dir()


def require_build() -> None:
    if (message := missing_build()) is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def download_command(folder: Path) -> list[str]:
    """pip's download of llama-cpp-python's source archive into `folder`: of this one package only, since
    `--no-binary :all:` would also build pip's build tools (cmake) from source to prepare its metadata, many
    minutes; naming the package takes seconds."""
    return [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
            f"llama-cpp-python=={VERSION}", "-d", str(folder)]


def setup() -> None:
    """Download, unpack, configure, build: each step skipped when its output is already there."""
    LLAMACPP.mkdir(parents=True, exist_ok=True)
    sdist = LLAMACPP / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file() and not (SOURCE / "CMakeLists.txt").is_file():
        subprocess.run(download_command(LLAMACPP), check=True)
    if not (SOURCE / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as archive:
            archive.extractall(LLAMACPP, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    if not converter_ready():  # convert_hf_to_gguf.py imports sentencepiece even for a BPE tokenizer
        subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(PYDEPS), SENTENCEPIECE], check=True)
    build = LLAMACPP / "build"
    cache, options = build / "CMakeCache.txt", isa_options(cpuinfo_flags())
    configured = cache.read_text() if cache.is_file() else ""
    if any(option[2:].replace("=", ":BOOL=") not in configured for option in options):  # none yet, or other options
        subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build), *CMAKE_FLAGS, *options], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *TARGETS], check=True)  # seconds when built
    print(f"llama.cpp {VERSION}: {', '.join(TARGETS)} ready in {BIN}", file=sys.stderr)


def cpuinfo_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def isa_options(cpu_flags: set[str]) -> list[str]:
    """cmake options: this CPU's instruction sets (ISA_OPTIONS) on, AMX off; -march=native where flags are unknown."""
    if not cpu_flags:
        return ["-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{option}={'ON' if flag in cpu_flags else 'OFF'}"
                                   for flag, option in ISA_OPTIONS.items()),
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def gguf_module():
    """llama.cpp's gguf-py from the vendored source (its reader and the converter's writer)."""
    sys.path.insert(0, str(SOURCE / "gguf-py"))
    return importlib.import_module("gguf")


def write_tokenizer(tokenizer_model: Path, folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json for Meta's tokenizer, as in Meta's Hugging Face release (byte-level BPE,
    Meta's split pattern, <|begin_of_text|> first), so llama.cpp's converter finds the "llama-bpe" pre-tokenizer."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama3_raw.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    tokenizer = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=SPLIT_PATTERN,
                                  extra_special_tokens=SPECIAL_TOKENS).converted()
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "model_max_length": 131072, "clean_up_tokenization_spaces": False}, indent=1))


def write_hf_folder(ckpt: Path, folder: Path) -> None:
    """The checkpoint as a Hugging Face folder, the input llama.cpp's converter takes."""
    import torch
    from safetensors.torch import save_file

    from bench.worker import hf_config, hf_state_dict
    from llama3_raw.checkpoints import default_tokenizer_path, load_checkpoint

    checkpoint = load_checkpoint(ckpt, show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(checkpoint.params, torch.bfloat16, checkpoint.tied_output)
    config.bos_token_id, config.eos_token_id = 128000, 128001
    config.save_pretrained(folder)
    state = hf_state_dict(checkpoint.weights, checkpoint.params)
    if checkpoint.tied_output:
        del state["lm_head.weight"]  # the same tensor as the embeddings; not stored, as Meta's 1B release
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(default_tokenizer_path(ckpt), folder)


def write_ggufs(ckpt: Path, threads: int) -> dict[str, Path]:
    """BF16 by convert_hf_to_gguf.py, the other widths by llama-quantize from it; each skipped when present."""
    paths = {impl: ckpt.with_name(ckpt.name + "-gguf") / f"{kind.lower()}.gguf" for impl, kind in WIDTHS.items()}
    bf16 = paths["llamacpp-bf16"]
    if not bf16.is_file():
        hf = bf16.parent / "hf"
        if not (hf / "tokenizer_config.json").is_file():
            write_hf_folder(ckpt, hf)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SOURCE / "gguf-py"), str(PYDEPS)]))
        run_logged([sys.executable, str(SOURCE / "convert_hf_to_gguf.py"), str(hf), "--outtype", "bf16",
                    "--outfile", str(bf16.with_suffix(".tmp"))], bf16.parent / "convert.log", env)
        bf16.with_suffix(".tmp").rename(bf16)
        shutil.rmtree(hf)
    for impl, path in paths.items():
        if not path.is_file():
            run_logged([str(BIN / "llama-quantize"), str(bf16), str(path.with_suffix(".tmp")), WIDTHS[impl],
                        str(threads)], path.with_suffix(".log"))
            path.with_suffix(".tmp").rename(path)
    return paths


def run_logged(command: list[str], log: Path, env: dict | None = None) -> None:
    """Run a step, its output in `log`; on failure the log's tail and one line saying which step failed."""
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{log.read_text()[-3000:]}\nerror: `{' '.join(command)}` failed (log: {log}).")


@functools.cache  # gguf-py takes ~13 s to read a Llama 3 vocabulary's 400k strings
def bytes_read_per_token(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes one decoded token reads, tensor bytes per GGML type): every tensor, less token_embd when an
    output.weight of its own exists (then the embeddings are only looked up)."""
    tensors = gguf_module().GGUFReader(path).tensors
    sizes = {t.name: int(t.n_bytes) for t in tensors}
    by_type = {kind: sum(int(t.n_bytes) for t in tensors if t.tensor_type.name == kind)
               for kind in {t.tensor_type.name for t in tensors}}
    looked_up = sizes["token_embd.weight"] if "output.weight" in sizes else 0
    return sum(sizes.values()) - looked_up, by_type


def parse_llama_bench(stdout: str) -> dict:
    """`llama-bench -o json` output -> prefill and decode tok/s: one object per test, the prompt test with
    n_gen 0 and the generation test with n_prompt 0; avg_ts is tokens/s averaged over its -r repetitions."""
    tests = json.loads(stdout)
    prefill = [t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0]
    decode = [t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
    if len(prefill) != 1 or len(decode) != 1:
        raise ValueError(f"expected one prompt and one generation test, got {len(prefill)} and {len(decode)}")
    keep = ("n_gen", "n_threads", "build_commit", "model_type", "model_size", "cpu_info", "flash_attn", "repack")
    return {"prefill_tok_s": prefill[0]["avg_ts"], "decode_tok_s": decode[0]["avg_ts"], "n_prompt": prefill[0]["n_prompt"],
            **{key: decode[0][key] for key in keep}}


def parse_peak_rss(stderr: str) -> int:
    """Bytes of the launcher's `peak_rss_kib=N exit=C` line (the last one: llama-bench logs before it)."""
    line = [line for line in stderr.splitlines() if line.startswith("peak_rss_kib=")][-1]
    return int(line.split()[0].split("=")[1]) * 1024


def run_llama_bench(impl: str, path: Path, threads: int, params) -> dict:
    """One llama-bench process on one GGUF; a run dict with the keys bench/worker.py prints (load time and the
    short prompt are not measured: None), then the read bandwidth right after it, as the workers do."""
    from bench.worker import read_bandwidth

    command = [sys.executable, "-S", "-c", LAUNCHER, str(BIN / "llama-bench"), "-m", str(path), "-p", str(PROMPT),
               "-n", str(GENERATE), "-t", str(threads), "-r", "1", "-o", "json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{result.stderr[-3000:]}\nerror: llama-bench on {path} failed (exit {result.returncode}).")
    timing = parse_llama_bench(result.stdout)
    bandwidth = read_bandwidth(threads)
    per_token, by_type = bytes_read_per_token(path)
    return {"impl": impl, "dtype": WIDTHS[impl], "threads": threads, "load_s": None, "prefill_short_tok_s": None,
            "peak_rss_bytes": parse_peak_rss(result.stderr), "baseline_rss_bytes": 0, "file_bytes": path.stat().st_size,
            "bandwidth_after_decode": bandwidth, "bytes_per_token": per_token, "tensor_bytes_by_type": by_type,
            "prefill_long_tok_s": timing["prefill_tok_s"], "decode_tok_s": timing["decode_tok_s"],
            "decode_steps": timing["n_gen"], "llama_bench": timing,  # and llama-bench's f16 cache of the prompt test:
            "kv_cache_bytes": 2 * params.n_layers * PROMPT * params.n_kv_heads * params.head_dim * 2}


def ratio_table(rows: list[dict]) -> str:
    """Markdown: ours / llama.cpp at each width where both ran (bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_0);
    "" when no pair ran."""
    lines = []
    for ours_impl, width, theirs_impl in PAIRS + gguf_rows.PAIRS:
        ours = [r for r in rows if r["impl"] == ours_impl and r["dtype"] == "bfloat16"]  # bf16 activations
        theirs = [r for r in rows if r["impl"] == theirs_impl]
        if not ours or not theirs:
            continue
        ours, theirs = ours[0], theirs[0]
        ratio = {key: ours[key]["median"] / theirs[key]["median"]
                 for key in ("decode_tok_s", "prefill_long_tok_s", "peak_rss_gb")}
        # each repetition's pair ran back to back (bench's rep_order): the median of their ratios
        by_rep = statistics.median(a / b for a, b in zip(ours["decode_tok_s_by_rep"], theirs["decode_tok_s_by_rep"]))
        lines.append(
            f"| {width} | {ours_impl} vs {IMPL_NAMES[theirs_impl]} | {ratio['decode_tok_s']:.2f}× | {by_rep:.2f}× | "
            f"{per_bandwidth_by_rep(ours, theirs)} | "
            f"{ratio['prefill_long_tok_s']:.2f}× | {ratio['peak_rss_gb']:.2f}× | {ours['file_gb'] / theirs['file_gb']:.2f}× | "
            f"{ours['bytes_per_token'] / theirs['bytes_per_token']:.2f}× | "
            f"{ours['fraction_of_overall_ceiling']:.0%} vs {theirs['fraction_of_overall_ceiling']:.0%} |")
    if not lines:
        return ""
    return "\n".join([
        "", "", "Ratios ours / llama.cpp per width (medians; above 1: ours is faster, or uses more memory or bytes; "
        "*rep by rep*: the median of each repetition's ratio, the two run back to back; *per GB/s*: each decode "
        "divided by the bandwidth read right after it first; "
        f"llama.cpp's decode is {GENERATE} tokens from an empty cache, its prefill {PROMPT} tokens)", "",
        "| width | pair | decode tok/s | decode, rep by rep | decode per GB/s, rep by rep | prefill tok/s | peak RSS | "
        "file | bytes read per token | decode of highest ceiling (ours vs llama.cpp) |",
        "|---|---|---|---|---|---|---|---|---|---|", *lines])


def per_bandwidth_by_rep(ours: dict, theirs: dict) -> str:
    """The median over repetitions of (ours' decode / the bandwidth read right after it) over (theirs' / theirs'):
    a pair back to back still meets different bandwidth now and then (it moves within seconds); "–" unmeasured."""
    pairs = zip(ours["decode_tok_s_by_rep"], ours["bandwidth_by_rep"], theirs["decode_tok_s_by_rep"], theirs["bandwidth_by_rep"])
    ratios = [(a / a_bw) / (b / b_bw) for a, a_bw, b, b_bw in pairs if a_bw and b_bw]
    return f"{statistics.median(ratios):.2f}×" if ratios else "–"


def tensor_errors(ckpt: Path, path: Path, layer: int = 0) -> dict[str, float]:
    """GGUF tensor name -> relative RMS difference from the checkpoint's, for the embeddings, final norm and one layer
    (0.0: equal). wq/wk went through Hugging Face's row permutation and llama.cpp's inverse: BF16 must match exactly."""
    import torch

    from llama3_raw.checkpoints import load_checkpoint

    from bench.ggml_rounding import LAYER_NAMES, gguf_name

    gguf = gguf_module()
    weights = load_checkpoint(ckpt, show_progress=False).weights
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    keys = [f"layers.{layer}.{meta}.weight" for meta in LAYER_NAMES] + ["tok_embeddings.weight", "norm.weight"]
    pairs = {gguf_name(key): key for key in keys}
    errors = {}
    for name, key in pairs.items():
        source = weights[key].float()
        values = torch.from_numpy(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).copy())
        errors[name] = float((values.reshape(source.shape) - source).norm() / source.norm())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["setup", "gguf", "check"],
                        help="setup: build llama.cpp; gguf: write the GGUF files; check: compare them with the checkpoint")
    parser.add_argument("--shape", choices=["1b", "8b"], default="1b")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.step == "setup":
        return setup()
    require_build()
    from bench.__main__ import write_random_checkpoint

    ckpt = write_random_checkpoint(OUT / f"ckpt-{args.shape}", args.shape)
    paths = write_ggufs(ckpt, args.threads)
    print(f"GGUF files: {', '.join(map(str, paths.values()))}", file=sys.stderr)
    for impl, path in paths.items() if args.step == "check" else ():
        errors = tensor_errors(ckpt, path)
        print(f"{IMPL_NAMES[impl]}: relative RMS difference from the checkpoint " +
              ", ".join(f"{name} {error:.2g}" for name, error in errors.items()))


if __name__ == "__main__":
    main()
