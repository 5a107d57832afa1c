"""Command line: `python run.py [PROMPT] [--ckpt-dir DIR] ...` completes a prompt with a Llama 3 checkpoint."""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from .errors import UserError
from .generate import Sampling, generate
from .loading import cast_weights, count_parameters, is_checkpoint_dir, load_checkpoint
from .params import load_params
from .tokenizer import TextStream, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO_ROOT / "weights"
SHIPPED_MODEL_NAME = "shakespeare"  # weights/shakespeare: the small model this project trains and ships
FORTY_TWO_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
GENERATION_DEFAULTS_FILE = "generation.json"  # a checkpoint may carry its own defaults for the flags below
BUILTIN_DEFAULTS = {"prompt": FORTY_TWO_PROMPT, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.9, "top_k": 0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DOWNLOAD_HELP = (
    "no checkpoint found under {weights}; download Meta-Llama-3-8B (from llama.meta.com, or the 'original/' folder "
    "of meta-llama/Meta-Llama-3-8B on Hugging Face: consolidated.00.pth, params.json, tokenizer.model) into "
    "{weights}/Meta-Llama-3-8B/, or pass --ckpt-dir DIR."
)


def find_default_checkpoint(weights_dir: Path | None = None) -> Path:
    """An official checkpoint under weights/ (or its original/ subfolder) first, then the shipped model."""
    weights_dir = weights_dir or WEIGHTS_DIR
    shipped = weights_dir / SHIPPED_MODEL_NAME
    candidates = []
    if weights_dir.is_dir():
        for folder in sorted(weights_dir.iterdir()):
            if folder == shipped:
                continue
            for candidate in (folder, folder / "original"):
                if is_checkpoint_dir(candidate):
                    candidates.append(candidate)
                    break
    if candidates:
        return candidates[0]
    if is_checkpoint_dir(shipped):
        return shipped
    raise UserError(DOWNLOAD_HELP.format(weights=weights_dir))


def generation_defaults(ckpt_dir: Path) -> dict:
    """Built-in defaults, overridden by the checkpoint's generation.json (e.g. a Shakespeare prompt)."""
    defaults = dict(BUILTIN_DEFAULTS)
    path = ckpt_dir / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return defaults
    checks = {"prompt": str, "max_new_tokens": positive_int, "temperature": non_negative_float,
              "top_p": probability, "top_k": non_negative_int}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or set(raw) - set(checks):
            raise ValueError
        for key, value in raw.items():
            if isinstance(value, bool) or checks[key](str(value)) != value:
                raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a valid generation.json (an object with only {', '.join(checks)}); "
                        f"fix or delete it.") from None
    return defaults | raw


def choose_dtype(requested: str, device: str, weights: dict[str, torch.Tensor]) -> torch.dtype:
    """float32 on the CPU when a float32 copy fits comfortably in memory (Meta's reference computes in
    float32 there); otherwise, and on CUDA, bfloat16, computed straight from the checkpoint's tensors."""
    if requested != "auto":
        return DTYPES[requested]
    if device == "cuda":
        return torch.bfloat16
    return torch.float32 if 4 * count_parameters(weights) < 0.5 * available_memory_bytes() else torch.bfloat16


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout carries only the text (or the JSON object)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


positive_int.__name__ = "positive integer"
non_negative_float.__name__ = "non-negative number"
probability.__name__ = "probability in (0, 1]"
non_negative_int.__name__ = "non-negative integer"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Complete a prompt with a Llama 3 checkpoint, written with raw tensors.")
    parser.add_argument("prompt", nargs="?", help="text to complete (default: the checkpoint's default prompt, "
                        "or the 42 prompt for official weights)")
    parser.add_argument("--ckpt-dir", type=Path, help="folder with params.json, consolidated.00.pth, tokenizer.model "
                        "(default: an official checkpoint under weights/, else the shipped model)")
    parser.add_argument("--tokenizer", help="tokenizer.model file or URL (default: the one beside the checkpoint)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate at most (default 32)")
    parser.add_argument("--temperature", type=non_negative_float, help="0 picks the most likely token (default 0)")
    parser.add_argument("--top-p", type=probability, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--top-k", type=non_negative_int, help="sample only from the k most likely tokens; 0: all (default)")
    parser.add_argument("--seed", type=int, help="random seed for sampling; the same seed repeats the same text")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (default auto: float32 on the CPU when it fits in memory, else bfloat16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings, nothing else")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu.")
    if args.tokenizer is not None and "://" not in args.tokenizer and not Path(args.tokenizer).is_file():
        raise UserError(f"--tokenizer {args.tokenizer} does not exist; pass the path of a tokenizer.model file.")
    ckpt_dir = args.ckpt_dir if args.ckpt_dir is not None else find_default_checkpoint()

    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist; pass --ckpt-dir with the folder holding "
                        f"params.json and consolidated.00.pth.")

    # Everything cheap is checked before the weights are read: a bad prompt should not cost a 16 GB load.
    start = time.perf_counter()
    defaults = generation_defaults(ckpt_dir)
    params = load_params(ckpt_dir / "params.json")
    tokenizer_path = args.tokenizer or str(ckpt_dir / "tokenizer.model")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.n_words != params.vocab_size:
        raise UserError(
            f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but {ckpt_dir / 'params.json'} says vocab_size "
            f"{params.vocab_size}; use the tokenizer.model that came with these weights."
        )
    prompt, max_new_tokens, temperature, top_p, top_k = (
        getattr(args, key) if getattr(args, key) is not None else defaults[key]
        for key in ("prompt", "max_new_tokens", "temperature", "top_p", "top_k"))
    prompt_ids = tokenizer.encode(prompt, bos=True)
    if len(prompt_ids) >= params.context_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context holds {params.context_len}; "
            f"shorten the prompt to leave room for new tokens."
        )

    checkpoint = load_checkpoint(ckpt_dir, show_progress=not args.json)
    dtype = choose_dtype(args.dtype, args.device, checkpoint.weights)
    weights = cast_weights(checkpoint.weights, dtype, args.device, show_progress=not args.json)
    del checkpoint  # when the dtype changed, this lets the memory-mapped file go
    n_parameters = count_parameters(weights)
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    log(f"loaded {ckpt_dir} ({n_parameters / 1e6:.1f}M parameters, {params.n_layers} layers) "
        f"as {str(dtype).removeprefix('torch.')} on {args.device} in {load_s:.1f}s")
    if len(prompt_ids) + max_new_tokens > params.context_len:
        log(f"note: generation stops at the context's end, after {params.context_len - len(prompt_ids)} new tokens")

    sampling = Sampling(temperature, top_p, top_k, args.seed)
    stream = TextStream(tokenizer)
    if not args.json:
        print(prompt, end="", flush=True)
    new_ids: list[int] = []
    text_parts: list[str] = []
    t_start = time.perf_counter()
    t_first = None
    for token in generate(weights, params, prompt_ids, max_new_tokens, tokenizer.stop_ids, sampling, dtype, args.device):
        if t_first is None:
            t_first = time.perf_counter()
        new_ids.append(token)
        piece = stream.push(token)
        text_parts.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    t_end = time.perf_counter()
    tail = stream.flush()
    text_parts.append(tail)
    if not args.json:
        print(tail, flush=True)

    prefill_s = (t_first if t_first is not None else t_end) - t_start
    decode_steps = max(len(new_ids) - 1, 0)
    decode_tok_per_s = decode_steps / (t_end - t_first) if decode_steps and t_end > t_first else 0.0
    stats = {"load_s": round(load_s, 4), "prefill_s": round(prefill_s, 4),
             "decode_tok_per_s": round(decode_tok_per_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if not args.json:
        log(f"[{len(prompt_ids)} prompt tokens, prefill {prefill_s:.2f}s; {len(new_ids)} new tokens, "
            f"{decode_tok_per_s:.2f} tok/s; peak RSS {stats['peak_rss_mb']:.0f} MB]")
    return {"model": str(ckpt_dir), "dtype": str(dtype).removeprefix("torch."), "prompt": prompt,
            "prompt_tokens": prompt_ids, "tokens": new_ids, "text": "".join(text_parts), "stats": stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    return 0
