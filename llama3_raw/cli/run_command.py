"""`run.py [PROMPT]` / `llama3-raw run`: complete a prompt, or a file of prompts as one batch.

This file only prints: which checkpoint, which defaults, which dtype and how many threads are the
library's rules (checkpoints/, threads.py), generation is generate.py's.
"""

import argparse
import resource
import sys
import time

import torch

from ..checkpoints import WEIGHTS_ENV, Model, check_quantize_request, is_shipped_model, load_model, open_folder
from ..errors import UserError
from ..generate import Sampling, generate, generate_batch, seeded
from ..prompts_file import read_prompts_file
from ..threads import use_threads
from ..tokenizer import TextStream


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout carries only the text (or the JSON object)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rank_stats(ranks) -> dict:
    """world_size, and under tensor parallelism every rank's own peak RSS (a collective: all ranks take part)."""
    if ranks.world_size == 1:
        return {"world_size": 1}
    return {"world_size": ranks.world_size,
            "peak_rss_mb_per_rank": ranks.all_gather(torch.tensor([peak_rss_mb()])).round().tolist()}


def count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def check_mode_flags(args: argparse.Namespace) -> None:
    check_quantize_request(args.quantize, args.dtype, args.save_quantized, args.group_size)
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
    """The cheap part of opening a checkpoint: the folder, its generation defaults, params and tokenizer;
    and the thread count for a model of its size."""
    folder = open_folder(args.ckpt_dir, args.tokenizer, args.device)
    use_threads(args.threads, folder.params.parameter_count())
    return folder, folder.params_for_generation(args.context_len)


def load_weights(args: argparse.Namespace, folder, params, start: float,
                 new_tokens: int | None = None) -> tuple[Model, float]:
    """The model in the compute dtype on the compute device, and the seconds since `start`; `new_tokens`: the
    most the run generates (None: a chat, as many as the session brings)."""
    model = load_model(folder, params, args.dtype, args.device, args.quantize, args.save_quantized,
                       show_progress=not args.json, ranks=args.ranks, group_size=args.group_size, new_tokens=new_tokens,
                       keep_gguf_int4=getattr(args, "gguf_int4", "keep") == "keep")
    if args.save_quantized is not None:
        log(f"saved the {args.quantize} weights to {args.save_quantized}; run them with --ckpt-dir {args.save_quantized}")
    load_s = time.perf_counter() - start
    shipped = (f" (the shipped model; official weights go in ./weights/NAME/, ${WEIGHTS_ENV} or --ckpt-dir)"
               if args.ckpt_dir is None and is_shipped_model(model.directory) else "")
    where = f"rank 0 of {args.ranks.world_size}: " if args.ranks.world_size > 1 else ""
    log(f"loaded {where}{model.directory}{shipped} ({model.n_parameters / 1e6:.1f}M parameters, {params.n_layers} layers) "
        f"as {str(model.dtype).removeprefix('torch.')}{f' with {model.quantization} weights' if model.quantization else ''} "
        f"on {args.device} in {load_s:.1f}s")
    log(f"dtype {model.dtype_reason}")
    return model, load_s


def setting(args: argparse.Namespace, defaults: dict, key: str):
    return getattr(args, key) if getattr(args, key) is not None else defaults[key]


def sampling_from(args: argparse.Namespace, defaults: dict) -> Sampling:
    """The sampling settings, with a seed for a sampled run: --seed, or a fresh one said on stderr."""
    sampling = seeded(Sampling(setting(args, defaults, "temperature"), setting(args, defaults, "top_p"),
                               setting(args, defaults, "top_k"), args.seed))
    if args.seed is None and sampling.seed is not None:
        log(f"sampling with seed {sampling.seed} (pass --seed {sampling.seed} to repeat this run)")
    return sampling


def run(args: argparse.Namespace) -> dict | list[dict] | None:
    check_mode_flags(args)
    if args.prompts_file is not None:
        return run_batch(args)
    return run_completion(args)


def encode_prompt(args: argparse.Namespace, folder, params) -> tuple[str, list[int]]:
    prompt = setting(args, folder.defaults, "prompt")
    prompt_ids = folder.tokenizer.encode(prompt, bos=True)
    if len(prompt_ids) >= params.context_len:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context holds {params.context_len}; "
            f"shorten the prompt to leave room for new tokens."
        )
    if not prompt:
        log("note: the prompt is empty, so the model writes from <|begin_of_text|> alone")
    return prompt, prompt_ids


def run_completion(args: argparse.Namespace) -> dict:
    # Everything cheap is checked before the weights are read: a bad prompt should not cost a 16 GB load.
    start = time.perf_counter()
    folder, params = open_checkpoint(args)
    prompt, prompt_ids = encode_prompt(args, folder, params)
    max_new_tokens = setting(args, folder.defaults, "max_new_tokens")
    model, load_s = load_weights(args, folder, params, start, max_new_tokens)
    if len(prompt_ids) + max_new_tokens > params.context_len:
        log(f"note: generation stops at the context's end, after {params.context_len - len(prompt_ids)} new tokens")

    sampling = sampling_from(args, folder.defaults)
    stream = TextStream(folder.tokenizer)
    if not args.json:
        print(prompt, end="", flush=True)
    new_ids: list[int] = []
    text_parts: list[str] = []
    t_start = time.perf_counter()
    t_first = None
    for token in generate(model.weights, params, prompt_ids, max_new_tokens, folder.tokenizer.stop_ids, sampling,
                          model.dtype, args.device, args.ranks):
        if t_first is None:
            t_first = time.perf_counter()
        new_ids.append(token)
        text_parts.append(stream.push(token))
        if not args.json:
            print(text_parts[-1], end="", flush=True)
    t_end = time.perf_counter()
    text_parts.append(stream.flush())
    if not args.json:
        print(text_parts[-1], flush=True)

    prefill_s = (t_first if t_first is not None else t_end) - t_start
    decode_steps = max(len(new_ids) - 1, 0)
    decode_tok_per_s = decode_steps / (t_end - t_first) if decode_steps and t_end > t_first else 0.0
    stats = {"load_s": round(load_s, 4), "prefill_s": round(prefill_s, 4),
             "decode_tok_per_s": round(decode_tok_per_s, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
             "seed": sampling.seed, "threads": torch.get_num_threads(), **rank_stats(args.ranks)}
    if not args.json:
        log(f"[{count(len(prompt_ids), 'prompt token')}, prefill {prefill_s:.2f}s; "
            f"{count(len(new_ids), 'new token')}, {decode_tok_per_s:.2f} tok/s; peak RSS {stats['peak_rss_mb']:.0f} MB]")
    return {"model": str(folder.directory), "source_format": model.source_format,
            "dtype": str(model.dtype).removeprefix("torch."), "prompt": prompt,
            "prompt_tokens": prompt_ids, "tokens": new_ids, "text": "".join(text_parts), "stats": stats}


def print_batch(results: list[dict]) -> None:
    """Each prompt and its completion, told apart: the prompt as written, the completion after a marker line."""
    for result in results:
        print(f"=== prompt {result['index'] + 1} ===\n{result['prompt']}\n--- completion ---\n{result['text']}\n",
              flush=True)


def run_batch(args: argparse.Namespace) -> list[dict]:
    """Every prompt of --prompts-file in one batch; returns one result per prompt, in file order."""
    start = time.perf_counter()
    prompts = read_prompts_file(args.prompts_file)
    folder, params = open_checkpoint(args)
    tokenizer = folder.tokenizer
    prompt_ids = [tokenizer.encode(prompt, bos=True) for prompt in prompts]
    for number, ids in enumerate(prompt_ids, start=1):
        if len(ids) >= params.context_len:
            raise UserError(f"prompt {number} of --prompts-file {args.prompts_file} is {len(ids)} tokens but the "
                            f"model's context holds {params.context_len}; shorten it to leave room for new tokens.")
    max_new_tokens = setting(args, folder.defaults, "max_new_tokens")
    model, load_s = load_weights(args, folder, params, start, max_new_tokens)
    sampling = sampling_from(args, folder.defaults)
    t_start = time.perf_counter()
    outputs = generate_batch(model.weights, params, prompt_ids, max_new_tokens,
                             tokenizer.stop_ids, sampling, model.dtype, args.device, args.ranks)
    generate_s = time.perf_counter() - t_start
    n_new = sum(len(ids) for ids in outputs)
    stats = {"load_s": round(load_s, 4), "batch_size": len(prompts), "generate_s": round(generate_s, 4),
             "new_tok_per_s": round(n_new / generate_s, 3) if generate_s > 0 else 0.0,
             "peak_rss_mb": round(peak_rss_mb(), 1), "seed": sampling.seed, "threads": torch.get_num_threads(),
             **rank_stats(args.ranks)}
    results = [{"index": i, "prompt": prompt, "prompt_tokens": ids, "tokens": new, "text": tokenizer.decode(new),
                "stats": stats} for i, (prompt, ids, new) in enumerate(zip(prompts, prompt_ids, outputs))]
    if not args.json:
        print_batch(results)
        log(f"[{count(len(prompts), 'prompt')} in one batch, {count(n_new, 'new token')} in {generate_s:.2f}s; "
            f"peak RSS {stats['peak_rss_mb']:.0f} MB]")
    return results
