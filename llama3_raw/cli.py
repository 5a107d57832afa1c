"""Command line: `python run.py [PROMPT] [--ckpt-dir DIR] ...` completes a prompt with a Llama 3 checkpoint.

Three modes: completing one prompt (the default), a batch of prompts (`--prompts-file`), and a chat with
an Instruct model (`--chat`, see chat.py). This file only parses flags and prints: which checkpoint,
which defaults and which dtype are the library's rules (checkpoints/), generation is generate.py's.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from .chat import ChatSession, check_messages, interactive_chat, read_chat_file, stream_reply
from .checkpoints import DTYPES, Model, check_quantize_request, load_model, open_folder
from .checkpoints.defaults import (CHAT_MAX_NEW_TOKENS, non_negative_int, positive_int, probability, seed,
                                   temperature, thread_count)
from .errors import UserError, run_tool
from .generate import Sampling, generate, generate_batch
from .parallel import as_one_of, join_ranks, launched_ranks, threads_per_rank
from .prompts_file import read_prompts_file
from .tokenizer import REMOTE_TIMEOUT_S, TextStream


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout carries only the text (or the JSON object)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Complete a prompt with a Llama 3 checkpoint, written with raw tensors.")
    parser.add_argument("prompt", nargs="?", help="text to complete (default: the checkpoint's default prompt, "
                        "or the 42 prompt for official weights)")
    parser.add_argument("--ckpt-dir", type=Path, help="folder with params.json, consolidated.00.pth, tokenizer.model "
                        "(default: an official checkpoint under weights/, else the shipped model)")
    parser.add_argument("--tokenizer", help="tokenizer.model file or URL (default: the one beside the checkpoint); "
                        f"a URL (gs://, az://, https://) gets {REMOTE_TIMEOUT_S} s to answer")
    parser.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate at most (default 32)")
    parser.add_argument("--temperature", type=temperature, help="0 picks the most likely token (default 0)")
    parser.add_argument("--top-p", type=probability, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--top-k", type=non_negative_int, help="sample only from the k most likely tokens; 0: all (default)")
    parser.add_argument("--seed", type=seed, help="random seed for sampling; the same seed repeats the same text")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=thread_count, help="CPU threads for the matrix kernels (default: one per "
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
    check_quantize_request(args.quantize, args.dtype, args.save_quantized)
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
    if launched_ranks() > 1 and args.message is None and args.chat_file is None:
        raise UserError("an interactive chat runs in one process; under torchrun pass --message or --chat-file.")
    if args.json and args.message is None and args.chat_file is None:
        raise UserError("--json with --chat needs --message or --chat-file: an interactive chat prints text.")


def open_checkpoint(args: argparse.Namespace):
    """The cheap part of opening a checkpoint: the folder, its generation defaults, params and tokenizer."""
    folder = open_folder(args.ckpt_dir, args.tokenizer, args.device)
    return folder, folder.params_for_generation(args.context_len)


def load_weights(args: argparse.Namespace, folder, params, start: float) -> tuple[Model, float]:
    """The model in the compute dtype on the compute device, and the seconds since `start`."""
    model = load_model(folder, params, args.dtype, args.device, args.quantize, args.save_quantized,
                       show_progress=not args.json, ranks=args.ranks)
    if args.save_quantized is not None:
        log(f"saved the int8 weights to {args.save_quantized}; run them with --ckpt-dir {args.save_quantized}")
    load_s = time.perf_counter() - start
    where = f"rank 0 of {args.ranks.world_size}: " if args.ranks.world_size > 1 else ""
    log(f"loaded {where}{model.directory} ({model.n_parameters / 1e6:.1f}M parameters, {params.n_layers} layers) "
        f"as {str(model.dtype).removeprefix('torch.')}{' with int8 weights' if model.is_int8 else ''} "
        f"on {args.device} in {load_s:.1f}s")
    return model, load_s


def setting(args: argparse.Namespace, defaults: dict, key: str):
    return getattr(args, key) if getattr(args, key) is not None else defaults[key]


def sampling_from(args: argparse.Namespace, defaults: dict) -> Sampling:
    return Sampling(setting(args, defaults, "temperature"), setting(args, defaults, "top_p"),
                    setting(args, defaults, "top_k"), args.seed)


def run(args: argparse.Namespace) -> dict | list[dict] | None:
    """The mode the flags ask for; `args.ranks` and `args.device` say where this process runs (see main)."""
    if args.threads is not None or args.ranks.world_size > 1:
        torch.set_num_threads(args.threads or threads_per_rank())  # ranks on one machine share its cores
    if args.chat:
        return run_chat(args)
    if args.prompts_file is not None:
        return run_batch(args)
    return run_completion(args)


def run_completion(args: argparse.Namespace) -> dict:
    # Everything cheap is checked before the weights are read: a bad prompt should not cost a 16 GB load.
    start = time.perf_counter()
    folder, params = open_checkpoint(args)
    defaults, tokenizer = folder.defaults, folder.tokenizer
    prompt, max_new_tokens = setting(args, defaults, "prompt"), setting(args, defaults, "max_new_tokens")
    prompt_ids = tokenizer.encode(prompt, bos=True)
    if len(prompt_ids) >= params.context_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context holds {params.context_len}; "
            f"shorten the prompt to leave room for new tokens."
        )

    model, load_s = load_weights(args, folder, params, start)
    weights, dtype = model.weights, model.dtype
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
    for token in generate(weights, params, prompt_ids, max_new_tokens, tokenizer.stop_ids, sampling, dtype, args.device,
                          args.ranks):
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
             "decode_tok_per_s": round(decode_tok_per_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
             "world_size": args.ranks.world_size}
    if args.ranks.world_size > 1:  # every rank's own peak (a collective: all ranks take part)
        stats["peak_rss_mb_per_rank"] = args.ranks.all_gather(torch.tensor([peak_rss_mb()])).round().tolist()
    if not args.json:
        log(f"[{len(prompt_ids)} prompt tokens, prefill {prefill_s:.2f}s; {len(new_ids)} new tokens, "
            f"{decode_tok_per_s:.2f} tok/s; peak RSS {stats['peak_rss_mb']:.0f} MB]")
    return {"model": str(folder.directory), "dtype": str(dtype).removeprefix("torch."), "prompt": prompt,
            "prompt_tokens": prompt_ids, "tokens": new_ids, "text": "".join(text_parts), "stats": stats}


def run_batch(args: argparse.Namespace) -> list[dict]:
    """Every prompt of --prompts-file in one batch; returns one result per prompt, in file order."""
    start = time.perf_counter()
    prompts = read_prompts_file(args.prompts_file)
    folder, params = open_checkpoint(args)
    defaults, tokenizer = folder.defaults, folder.tokenizer
    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    for number, ids in enumerate(prompt_ids, start=1):
        if len(ids) >= params.context_len:
            raise UserError(f"prompt {number} of --prompts-file {args.prompts_file} is {len(ids)} tokens but the "
                            f"model's context holds {params.context_len}; shorten it to leave room for new tokens.")
    model, load_s = load_weights(args, folder, params, start)
    weights, dtype = model.weights, model.dtype
    max_new_tokens = setting(args, defaults, "max_new_tokens")
    t_start = time.perf_counter()
    outputs = generate_batch(weights, params, prompt_ids, max_new_tokens, tokenizer.stop_ids,
                             sampling_from(args, defaults), dtype, args.device, args.ranks)
    generate_s = time.perf_counter() - t_start
    n_new = sum(len(ids) for ids in outputs)
    stats = {"load_s": round(load_s, 4), "batch_size": len(prompts), "generate_s": round(generate_s, 4),
             "new_tok_per_s": round(n_new / generate_s, 3) if generate_s > 0 else 0.0,
             "peak_rss_mb": round(peak_rss_mb(), 1), "world_size": args.ranks.world_size}
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
    folder, params = open_checkpoint(args)
    defaults, tokenizer = folder.defaults, folder.tokenizer
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else CHAT_MAX_NEW_TOKENS
    model, load_s = load_weights(args, folder, params, start)
    weights, dtype = model.weights, model.dtype
    session = ChatSession(weights, params, tokenizer, max_new_tokens, sampling_from(args, defaults), dtype,
                          args.device, notice=log, ranks=args.ranks)
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
    stats = {"load_s": round(load_s, 4), "generate_s": round(generate_s, 4), "peak_rss_mb": round(peak_rss_mb(), 1),
             "world_size": args.ranks.world_size}
    return {"model": str(folder.directory), "dtype": str(dtype).removeprefix("torch."), "messages": session.dialog(),
            "prompt_tokens": prompt_ids, "tokens": reply_ids, "text": session.messages[-1]["content"], "stats": stats}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        check_mode_flags(args)
        args.ranks, args.device = join_ranks(args.device)  # under torchrun: this rank's place; else one process
        with as_one_of(args.ranks):
            result = run(args)
            if args.json and isinstance(result, list):  # --prompts-file: JSON lines, one object per prompt
                for item in result:
                    print(json.dumps(item))
            elif args.json:
                print(json.dumps(result))

    return run_tool(work)
