"""Command line: `python run.py [PROMPT] [--ckpt-dir DIR] ...` completes a prompt with a Llama 3 checkpoint.

Three modes share the checks and the loading: completing one prompt (the default), a batch of
prompts (`--prompts-file`), and a chat with an Instruct model (`--chat`, see chat.py).
"""

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .chat import ChatSession, check_messages, interactive_chat, read_chat_file, stream_reply
from .errors import UserError, run_tool
from .generate import Sampling, generate, generate_batch
from .loading import (cast_weights, check_new_folder, count_parameters, is_checkpoint_dir, is_int8, load_checkpoint,
                      save_int8_checkpoint)
from .prompts_file import read_prompts_file
from .quantize import quantize_weights
from .session import check_device, open_params, open_tokenizer
from .tokenizer import TextStream

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = REPO_ROOT / "weights"
SHIPPED_MODEL_NAME = "shakespeare"  # weights/shakespeare: the small model this project trains and ships
FORTY_TWO_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
GENERATION_DEFAULTS_FILE = "generation.json"  # a checkpoint may carry its own defaults for the flags below
BUILTIN_DEFAULTS = {"prompt": FORTY_TWO_PROMPT, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.9, "top_k": 0}
CHAT_MAX_NEW_TOKENS = 1024  # a chat reply's default limit; the reply normally ends at <|eot_id|> long before
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
              "top_p": probability, "top_k": non_negative_int,
              "context_len": positive_int}  # the context the model was trained for, if shorter than its family's
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
    parser.add_argument("--threads", type=positive_int, help="CPU threads for the matrix kernels (default: one per "
                        "core); on a machine shared with other work, fewer threads than cores is faster")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: store each weight matrix as int8 with one scale per output row (made at load "
                        "time), computing in bfloat16; half the bytes of bf16 per token")
    parser.add_argument("--save-quantized", type=Path, metavar="DIR",
                        help="with --quantize int8: also write the int8 weights to the new folder DIR as a checkpoint "
                        "that later runs load directly (--ckpt-dir DIR), without quantizing again")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (default auto: float32 on the CPU when it fits in memory, else bfloat16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings, nothing "
                        "else (with --prompts-file: one JSON object per prompt, one per line)")
    parser.add_argument("--context-len", type=positive_int, help="the context in tokens (default: the model's own "
                        "maximum, 8192 for Llama 3, 131072 for 3.1+); the KV cache only takes what a run needs")
    parser.add_argument("--prompts-file", type=Path, help="generate for every prompt in this file as one batch: one "
                        "prompt per line, or JSON lines with a \"prompt\" field")
    parser.add_argument("--chat", action="store_true", help="chat with an Instruct model: one message per input line "
                        "(/reset forgets, /exit ends), or one reply with --message / --chat-file")
    parser.add_argument("--system", help="with --chat: the system prompt")
    parser.add_argument("--message", help="with --chat: answer this one message and exit")
    parser.add_argument("--chat-file", type=Path, help="with --chat: a JSON list of {\"role\", \"content\"} messages to "
                        "start from; answers the last user message (or --message) and exits")
    return parser


def check_mode_flags(args: argparse.Namespace) -> None:
    if args.quantize == "int8" and args.dtype == "float32":
        raise UserError("--quantize int8 computes in bfloat16 (int8 weights, bf16 activations); drop --dtype float32.")
    if args.save_quantized is not None:
        if args.quantize != "int8":
            raise UserError("--save-quantized writes int8 weights; add --quantize int8.")
        check_new_folder(args.save_quantized, "--save-quantized")
    if not args.chat:
        used = [flag for flag, value in (("--system", args.system), ("--message", args.message),
                                         ("--chat-file", args.chat_file)) if value is not None]
        if used:
            raise UserError(f"{used[0]} only applies to a chat; add --chat.")
        if args.prompts_file is not None and args.prompt is not None:
            raise UserError("give either a PROMPT or --prompts-file, not both; put the prompt in the file.")
        return
    if args.prompts_file is not None:
        raise UserError("--prompts-file and --chat do not combine; use --chat-file for a conversation.")
    if args.prompt is not None:
        raise UserError(f"--chat takes its message from --message (or from standard input), not as PROMPT {args.prompt!r}.")
    if args.json and args.message is None and args.chat_file is None:
        raise UserError("--json with --chat needs --message or --chat-file: an interactive chat prints text.")


def open_checkpoint(args: argparse.Namespace):
    """The cheap part of opening a checkpoint: its folder, generation defaults, params and tokenizer."""
    check_device(args.device)
    ckpt_dir = args.ckpt_dir if args.ckpt_dir is not None else find_default_checkpoint()
    params = open_params(ckpt_dir)
    defaults = generation_defaults(ckpt_dir)
    if args.context_len is None and "context_len" in defaults:
        params = replace(params, max_seq_len=min(defaults["context_len"], params.context_len))
    elif args.context_len is not None:
        if args.context_len > params.context_len:
            raise UserError(f"--context-len {args.context_len} exceeds this model's maximum of {params.context_len} "
                            f"tokens; pass at most {params.context_len}.")
        params = replace(params, max_seq_len=args.context_len)
    return ckpt_dir, defaults, params, open_tokenizer(ckpt_dir, params, args.tokenizer)


def load_weights(args: argparse.Namespace, ckpt_dir: Path, params, start: float):
    """The weights in the compute dtype on the compute device: (weights, dtype, load seconds)."""
    checkpoint = load_checkpoint(ckpt_dir, show_progress=not args.json)
    int8 = args.quantize == "int8" or is_int8(checkpoint.weights)
    if int8 and args.dtype == "float32":
        raise UserError(f"{ckpt_dir} holds int8 weights, which compute in bfloat16; drop --dtype float32.")
    dtype = torch.bfloat16 if int8 else choose_dtype(args.dtype, args.device, checkpoint.weights)
    weights = cast_weights(checkpoint.weights, dtype, args.device, show_progress=not args.json)
    del checkpoint  # when the dtype changed, this lets the memory-mapped file go
    n_parameters = count_parameters(weights)
    if args.quantize == "int8":
        weights = quantize_weights(weights, dtype)  # matrices as int8 + per-row scales, activations in bf16
    if args.save_quantized is not None:
        save_int8_checkpoint(weights, ckpt_dir, args.save_quantized, extra_files=(GENERATION_DEFAULTS_FILE,))
        log(f"saved the int8 weights to {args.save_quantized}; run them with --ckpt-dir {args.save_quantized}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    log(f"loaded {ckpt_dir} ({n_parameters / 1e6:.1f}M parameters, {params.n_layers} layers) "
        f"as {str(dtype).removeprefix('torch.')}{' with int8 weights' if int8 else ''} "
        f"on {args.device} in {load_s:.1f}s")
    return weights, dtype, load_s


def setting(args: argparse.Namespace, defaults: dict, key: str):
    return getattr(args, key) if getattr(args, key) is not None else defaults[key]


def sampling_from(args: argparse.Namespace, defaults: dict) -> Sampling:
    return Sampling(setting(args, defaults, "temperature"), setting(args, defaults, "top_p"),
                    setting(args, defaults, "top_k"), args.seed)


def run(args: argparse.Namespace) -> dict | list[dict] | None:
    check_mode_flags(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.chat:
        return run_chat(args)
    if args.prompts_file is not None:
        return run_batch(args)
    return run_completion(args)


def run_completion(args: argparse.Namespace) -> dict:
    # Everything cheap is checked before the weights are read: a bad prompt should not cost a 16 GB load.
    start = time.perf_counter()
    ckpt_dir, defaults, params, tokenizer = open_checkpoint(args)
    prompt, max_new_tokens = setting(args, defaults, "prompt"), setting(args, defaults, "max_new_tokens")
    prompt_ids = tokenizer.encode(prompt, bos=True)
    if len(prompt_ids) >= params.context_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context holds {params.context_len}; "
            f"shorten the prompt to leave room for new tokens."
        )

    weights, dtype, load_s = load_weights(args, ckpt_dir, params, start)
    if len(prompt_ids) + max_new_tokens > params.context_len:
        log(f"note: generation stops at the context's end, after {params.context_len - len(prompt_ids)} new tokens")

    sampling = sampling_from(args, defaults)
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


def run_batch(args: argparse.Namespace) -> list[dict]:
    """Every prompt of --prompts-file in one batch; returns one result per prompt, in file order."""
    start = time.perf_counter()
    prompts = read_prompts_file(args.prompts_file)
    ckpt_dir, defaults, params, tokenizer = open_checkpoint(args)
    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    for number, ids in enumerate(prompt_ids, start=1):
        if len(ids) >= params.context_len:
            raise UserError(f"prompt {number} of --prompts-file {args.prompts_file} is {len(ids)} tokens but the "
                            f"model's context holds {params.context_len}; shorten it to leave room for new tokens.")
    weights, dtype, load_s = load_weights(args, ckpt_dir, params, start)
    max_new_tokens = setting(args, defaults, "max_new_tokens")
    t_start = time.perf_counter()
    outputs = generate_batch(weights, params, prompt_ids, max_new_tokens, tokenizer.stop_ids,
                             sampling_from(args, defaults), dtype, args.device)
    generate_s = time.perf_counter() - t_start
    n_new = sum(len(ids) for ids in outputs)
    stats = {"load_s": round(load_s, 4), "batch_size": len(prompts), "generate_s": round(generate_s, 4),
             "new_tok_per_s": round(n_new / generate_s, 3) if generate_s > 0 else 0.0,
             "peak_rss_mb": round(peak_rss_mb(), 1)}
    results = [{"index": i, "prompt": prompt, "prompt_tokens": ids, "tokens": new, "text": tokenizer.decode(new),
                "stats": stats} for i, (prompt, ids, new) in enumerate(zip(prompts, prompt_ids, outputs))]
    if not args.json:
        for result in results:
            print(result["prompt"] + result["text"], end="\n\n", flush=True)
        log(f"[{len(prompts)} prompts in one batch, {n_new} new tokens in {generate_s:.2f}s; "
            f"peak RSS {stats['peak_rss_mb']:.0f} MB]")
    return results


def run_chat(args: argparse.Namespace) -> dict | None:
    """An interactive chat on stdin/stdout, or one reply (--message / --chat-file) for scripts."""
    start = time.perf_counter()
    messages = read_chat_file(args.chat_file) if args.chat_file is not None else []
    if args.system is not None:
        if messages and messages[0]["role"] == "system":
            raise UserError(f"--chat-file {args.chat_file} already has a system message; drop --system or that message.")
        messages.insert(0, {"role": "system", "content": args.system})
    if args.message is not None:
        messages.append({"role": "user", "content": args.message})
    one_shot = args.message is not None or args.chat_file is not None
    if one_shot and (not messages or messages[-1]["role"] != "user"):
        raise UserError(f"--chat-file {args.chat_file} does not end with a user message; add one, or pass --message.")
    check_messages(messages, "the conversation", "check --chat-file")
    ckpt_dir, defaults, params, tokenizer = open_checkpoint(args)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else CHAT_MAX_NEW_TOKENS
    weights, dtype, load_s = load_weights(args, ckpt_dir, params, start)
    session = ChatSession(weights, params, tokenizer, max_new_tokens, sampling_from(args, defaults), dtype,
                          args.device, notice=log)
    for message in messages:
        session.add(message["role"], message["content"])

    if not one_shot:
        def write(text: str) -> None:
            print(text, end="", flush=True)

        def ask(marker: str) -> None:
            if sys.stdin.isatty():  # the "> " marker is for people; a script reading stdout sees only replies
                print(marker, end="", file=sys.stderr, flush=True)

        interactive_chat(session, iter(sys.stdin), write, ask)
        return None

    t_start = time.perf_counter()
    prompt_ids = session.fit_to_context(session.dialog_ids())
    write = (lambda _text: None) if args.json else (lambda text: print(text, end="", flush=True))
    reply_ids = stream_reply(session, session.respond(), write)
    generate_s = time.perf_counter() - t_start
    if not args.json:
        print(flush=True)
    stats = {"load_s": round(load_s, 4), "generate_s": round(generate_s, 4), "peak_rss_mb": round(peak_rss_mb(), 1)}
    return {"model": str(ckpt_dir), "dtype": str(dtype).removeprefix("torch."), "messages": session.dialog(),
            "prompt_tokens": prompt_ids, "tokens": reply_ids, "text": session.messages[-1]["content"], "stats": stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        result = run(args)
        if args.json and isinstance(result, list):  # --prompts-file: JSON lines, one object per prompt
            for item in result:
                print(json.dumps(item))
        elif args.json:
            print(json.dumps(result))

    return run_tool(work)
