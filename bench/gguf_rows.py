"""This project reading llama.cpp's own GGUF files: the bench rows "llama3_raw on GGUF ...".

    python -m bench --dtypes bfloat16 --impls ours llamacpp gguf --reps 3   # each right after llama.cpp on its file
    python -m bench.first_token --impls llamacpp-q4_0 ours-gguf-int4 ours-gguf-int4-requantize ours-gguf-bf16-int4

The files are the ones llama.cpp's rows read (bench/llamacpp.py writes them from the bench's random checkpoint:
convert_hf_to_gguf.py to BF16, llama-quantize to Q8_0 and Q4_0), opened the way run.py opens them
(checkpoints.open_folder and load_model), so each row is this project on the very bytes llama.cpp was given:

- on BF16: the file's bf16 matrices, computed in bf16 (llama.cpp BF16);
- on Q8_0: dequantized to bf16 at load, then int8 with a scale per row (`--quantize int8`; llama.cpp Q8_0);
- on Q4_0: its blocks of 32 kept as the project's int4 in groups of 32, nothing rounded again (`--quantize int4`,
  gguf_quants.as_int4), and the tied embedding / output matrix, which llama-quantize writes in Q6_K,
  dequantized and quantized to int4 (llama.cpp Q4_0).

For the time to first token (bench/first_token.py) two more ways of reaching int4 are timed beside the kept blocks:
the Q4_0 file dequantized and quantized again (`--gguf-int4 requantize`), and the BF16 file quantized at load.
"""

from pathlib import Path

import torch

# impl -> (the llama.cpp row whose GGUF file it reads, run.py's flags for it); the first three are bench rows too
GGUF_IMPLS = {
    "ours-gguf-bf16": ("llamacpp-bf16", ["--dtype", "bfloat16"]),
    "ours-gguf-int8": ("llamacpp-q8_0", ["--quantize", "int8"]),
    "ours-gguf-int4": ("llamacpp-q4_0", ["--quantize", "int4"]),
}
FIRST_TOKEN_ONLY = {  # other ways to int4, for the time to first token
    "ours-gguf-int4-requantize": ("llamacpp-q4_0", ["--quantize", "int4", "--gguf-int4", "requantize"]),
    "ours-gguf-bf16-int4": ("llamacpp-bf16", ["--quantize", "int4"]),
}
IMPL_NAMES = {"ours-gguf-bf16": "llama3_raw on GGUF BF16", "ours-gguf-int8": "llama3_raw on GGUF Q8_0 (int8)",
              "ours-gguf-int4": "llama3_raw on GGUF Q4_0 (int4, blocks kept)",
              "ours-gguf-int4-requantize": "llama3_raw on GGUF Q4_0 (int4, dequantized + quantized again)",
              "ours-gguf-bf16-int4": "llama3_raw on GGUF BF16 (int4, quantized at load)"}
SHORT_NAMES = {"ours-gguf-bf16": "ours\nGGUF BF16", "ours-gguf-int8": "ours\nGGUF Q8_0", "ours-gguf-int4": "ours\nGGUF Q4_0"}
COLORS = {"ours-gguf-bf16": "tab:blue", "ours-gguf-int8": "tab:cyan", "ours-gguf-int4": "tab:purple"}
ALL_WAYS = {**GGUF_IMPLS, **FIRST_TOKEN_ONLY}
# (ours, width, theirs) for the ratio tables: the same file on both sides
PAIRS = [("ours-gguf-bf16", "BF16 file", "llamacpp-bf16"), ("ours-gguf-int8", "Q8_0 file", "llamacpp-q8_0"),
         ("ours-gguf-int4", "Q4_0 file", "llamacpp-q4_0")]


def gguf_file(impl: str, ggufs: dict[str, Path]) -> Path:
    """The GGUF file that `impl` reads: the one its llama.cpp partner reads."""
    return ggufs[ALL_WAYS[impl][0]]


def run_flags(impl: str) -> list[str]:
    return ALL_WAYS[impl][1]


def load_options(impl: str) -> dict:
    """load_model's arguments that `impl`'s run.py flags mean (the library turns flags into these, not the bench)."""
    flags = run_flags(impl)
    return {"quantize": flags[flags.index("--quantize") + 1] if "--quantize" in flags else "none",
            "keep_gguf_int4": "requantize" not in flags}


def load_gguf(impl: str, path: Path, dtype: str, device: str) -> tuple[dict, object, int]:
    """(weights, params, file bytes) of `path` as run.py loads it with `impl`'s flags: compute dtype `dtype`."""
    from llama3_raw.checkpoints import load_model, open_folder

    folder = open_folder(path, device=device)
    model = load_model(folder, dtype=dtype, device=device, show_progress=False, **load_options(impl))
    if device == "cuda":
        torch.cuda.synchronize()
    return model.weights, model.params, path.stat().st_size


def place_after_llamacpp(order: list[str], impls: list[str]) -> list[str]:
    """`order` with each requested GGUF row right after llama.cpp's run of the same file (or at the end when
    llama.cpp does not run): the machine's bandwidth drifts, runs back to back meet nearly the same."""
    wanted = [impl for impl in GGUF_IMPLS if impl in impls or "gguf" in impls]
    placed = []
    for impl in order:
        placed.append(impl)
        placed += [ours for ours in wanted if GGUF_IMPLS[ours][0] == impl]
    return placed + [ours for ours in wanted if ours not in placed]
