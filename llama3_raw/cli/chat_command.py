"""`llama3-raw chat` (or `run.py --chat`): chat with an Instruct model, interactively or one reply for scripts."""

import argparse
import sys
import time

from ..chat import ChatSession, check_messages, interactive_chat, read_chat_file, stream_reply
from ..checkpoints.defaults import CHAT_MAX_NEW_TOKENS
from ..errors import UserError
from .run_command import load_weights, log, open_checkpoint, peak_rss_mb, rank_stats, sampling_from


def conversation_from(args: argparse.Namespace) -> tuple[list[dict], bool]:
    """The messages to start from (--chat-file, --system, --message) and whether to answer once and exit."""
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
    return messages, one_shot


def run_chat(args: argparse.Namespace) -> dict | None:
    """An interactive chat on stdin/stdout, or one reply (--message / --chat-file) for scripts."""
    start = time.perf_counter()
    messages, one_shot = conversation_from(args)
    if not one_shot and args.ranks.world_size > 1:
        raise UserError("an interactive chat runs in one process; under torchrun pass --message or --chat-file.")
    folder, params = open_checkpoint(args)
    if folder.tokenizer.chat_format != "llama3":
        raise UserError(f"{folder.directory}'s vocabulary has no Llama 3 chat tokens (<|start_header_id|>, "
                        f"<|eot_id|>), and --chat speaks only Llama 3's chat format; run it without --chat, as a "
                        f"completion.")
    if folder.is_base_model:
        log(f"warning: {folder.directory} is a base model, not an Instruct one (its generation.json says "
            f"\"instruct\": false); it continues text and will not follow the chat format; expect odd replies.")
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else CHAT_MAX_NEW_TOKENS
    model, load_s = load_weights(args, folder, params, start)
    session = ChatSession(model.weights, params, folder.tokenizer, max_new_tokens, sampling_from(args, folder.defaults),
                          model.dtype, args.device, notice=log, ranks=args.ranks)
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
             "seed": session.sampling.seed, **rank_stats(args.ranks)}
    return {"model": str(folder.directory), "dtype": str(model.dtype).removeprefix("torch."), "messages": session.dialog(),
            "prompt_tokens": prompt_ids, "tokens": reply_ids, "text": session.messages[-1]["content"], "stats": stats}
