"""The flags of `run` and `chat`, with help that says where each default comes from.

A checkpoint's generation.json overrides the built-in generation defaults (the shipped model samples 200
tokens at temperature 0.8, not 32 greedy ones), so the help reads that file, for the checkpoint a run with
the same --ckpt-dir would open, and names it beside every value it sets.
"""

import argparse
import json
import os
from pathlib import Path

from ..checkpoints import DTYPES, WEIGHTS_ENV, DefaultsSource, defaults_source
from ..checkpoints.defaults import (BUILTIN_DEFAULTS, CHAT_MAX_NEW_TOKENS, auto_dtype_help, non_negative_int,
                                    positive_int, probability, seed, temperature, thread_count)
from ..quantize import INT4_GROUP_SIZE, INT4_GROUP_SIZES
from ..threads import SMALL_MODEL_PARAMETERS
from ..tokenizer import REMOTE_TIMEOUT_S

SETTING_HELP = {
    "max_new_tokens": "tokens to generate at most",
    "temperature": "0 always picks the most likely token; above 0 samples (higher: more freely)",
    "top_p": "nucleus sampling: sample only from the most likely tokens that make up this probability mass",
    "top_k": "sample only from the k most likely tokens; 0 keeps all",
}
SETTING_TYPES = {"max_new_tokens": positive_int, "temperature": temperature, "top_p": probability,
                 "top_k": non_negative_int}

EXAMPLES = """examples:
  {prog}
      complete the checkpoint's default prompt, with its defaults
  {prog} "ROMEO:" --max-new-tokens 50 --temperature 0
      50 new tokens, each the most likely one
  {prog} "ROMEO:" --temperature 0.8 --seed 7
      sampled; the same seed gives the same text again
  {prog} --ckpt-dir weights/Meta-Llama-3-8B --json
      one JSON object with the tokens, the text and timings
  {prog} --prompts-file prompts.txt
      every line of the file, as one batch
  {top} chat --ckpt-dir weights/Meta-Llama-3-8B-Instruct
      a chat with an Instruct model
  {top} --help
      the other commands: chat, inspect, compare, score"""


def shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it (shorter to read), else absolute."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def default_note(key: str, source: DefaultsSource) -> str:
    builtin = BUILTIN_DEFAULTS[key]
    if key in source.file_settings:
        note = (f"default {json.dumps(source.file_settings[key])}, from the checkpoint's generation.json; "
                f"built-in {json.dumps(builtin)}")
    else:
        note = f"default {json.dumps(builtin)}, built-in"
    return note.replace("%", "%%")  # argparse formats help strings with %


def checkpoint_note(source: DefaultsSource) -> str:
    found = f"now: {shown(source.directory)}" if source.directory is not None else f"now none: {source.problem}"
    return (f"checkpoint folder (params.json, consolidated.00.pth, tokenizer.model); default: the first official "
            f"checkpoint in ${WEIGHTS_ENV}, ./weights/ or the clone's weights/, else the shipped Shakespeare "
            f"model ({found})").replace("%", "%%")


def add_model_arguments(parser: argparse.ArgumentParser, source: DefaultsSource, chat: bool) -> None:
    """What every run and chat shares: the checkpoint, the generation settings, and how to compute."""
    parser.add_argument("--ckpt-dir", type=Path, help=checkpoint_note(source))
    parser.add_argument("--tokenizer", help="tokenizer.model file or URL (default: the one beside the checkpoint); "
                        f"a URL gets {REMOTE_TIMEOUT_S} s to answer")
    for key, help_text in SETTING_HELP.items():
        note = f"default {CHAT_MAX_NEW_TOKENS}, built-in for a chat reply" if chat and key == "max_new_tokens" \
            else default_note(key, source)
        parser.add_argument(f"--{key.replace('_', '-')}", type=SETTING_TYPES[key], help=f"{help_text} ({note})")
    parser.add_argument("--seed", type=seed, help="random seed for sampling; the same seed repeats the same text "
                        "(default: a fresh one, printed on stderr so that the run can be repeated)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    add_threads_argument(parser)
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                        help="int8: store each weight matrix as int8 with one scale per output row; int4: as 4-bit "
                        "values with a scale and a zero per --group-size inputs of a row. Made at load time, computing "
                        "in bfloat16; a half (int8) or about a third (int4) of the bytes of bf16 per token (default none)")
    parser.add_argument("--group-size", type=int, choices=INT4_GROUP_SIZES,
                        help="with --quantize int4: inputs of a row that share one scale and zero; smaller is more "
                        f"accurate, larger a little smaller (default {INT4_GROUP_SIZE})")
    parser.add_argument("--gguf-int4", choices=["keep", "requantize"], default="keep",
                        help="with --quantize int4 (groups of 32) and a GGUF file: keep its Q4_0 / Q4_1 blocks as they "
                        "are (default keep: no second rounding, no quantizing work), or dequantize and quantize again")
    parser.add_argument("--save-quantized", type=Path, metavar="DIR",
                        help="with --quantize int8 or int4: also write the quantized weights to the new folder DIR as a "
                        "checkpoint that later runs load directly (--ckpt-dir DIR), without quantizing again")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help=f"compute dtype (default {auto_dtype_help()})".replace("%", "%%"))
    parser.add_argument("--context-len", type=positive_int, help="the context in tokens (default: the context the "
                        "model was trained for, from generation.json, else the model's own maximum, 8192 for Llama 3, "
                        "131072 for 3.1+); the KV cache only takes what a run needs")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=thread_count, help=f"CPU threads for the matrix kernels (default: 1 for a "
                        f"model under {SMALL_MODEL_PARAMETERS // 1_000_000}M parameters, else the cores that other "
                        f"work leaves idle; see docs/command-line.md, Threads)")


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--message", help="answer this one message and exit")
    parser.add_argument("--chat-file", type=Path, help="a JSON list of {\"role\", \"content\"} messages to start "
                        "from; answers the last user message (or --message) and exits")


def add_run_arguments(parser: argparse.ArgumentParser, source: DefaultsSource) -> None:
    """`run.py` / `llama3-raw run`: complete a prompt (or a file of prompts); --chat is `chat`'s older spelling."""
    prompt_default = default_note("prompt", source)
    parser.add_argument("prompt", nargs="?", help=f"text to complete; an empty string starts from "
                        f"<|begin_of_text|> alone ({prompt_default})")
    add_model_arguments(parser, source, chat=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and timings, "
                        "nothing else (with --prompts-file: one JSON object per prompt, one per line)")
    parser.add_argument("--prompts-file", type=Path, help="generate for every prompt in this file as one batch: one "
                        "prompt per line, or JSON lines with a \"prompt\" field")
    parser.add_argument("--chat", action="store_true", help="chat with an Instruct model, as the chat command does")
    chat = parser.add_argument_group("with --chat")
    add_chat_arguments(chat)
    parser.set_defaults(chat=False)


def add_chat_command_arguments(parser: argparse.ArgumentParser, source: DefaultsSource) -> None:
    """`llama3-raw chat`: one message per input line (/reset forgets, /exit ends), or one reply for scripts."""
    add_model_arguments(parser, source, chat=True)
    parser.add_argument("--json", action="store_true", help="with --message or --chat-file: print one JSON object")
    add_chat_arguments(parser)
    parser.set_defaults(chat=True, prompt=None, prompts_file=None)


def defaults_paragraph(source: DefaultsSource) -> str:
    """Which checkpoint a run without --ckpt-dir would open, and what its generation.json sets."""
    if source.directory is None:
        return f"defaults: built-in only; no checkpoint to read them from: {source.problem}"
    where = shown(source.directory / "generation.json")
    if not source.file_settings:
        return f"defaults: the checkpoint is {shown(source.directory)}, which has no generation.json: all built-in."
    settings = ", ".join(f"{key} {json.dumps(value)}" for key, value in source.file_settings.items())
    return f"defaults: the checkpoint is {shown(source.directory)}; {where} sets {settings}; flags win over it."


def epilog(prog: str, top: str, source: DefaultsSource) -> str:
    return defaults_paragraph(source).replace("%", "%%") + "\n\n" + EXAMPLES.format(prog=prog, top=top)


def source_for(argv: list[str]) -> DefaultsSource:
    """The defaults' source for the --ckpt-dir in `argv` (a first, lenient look: the real parse comes after)."""
    ckpt_dir = None
    for index, word in enumerate(argv):
        if word == "--ckpt-dir" and index + 1 < len(argv):
            ckpt_dir = Path(argv[index + 1])
        elif word.startswith("--ckpt-dir="):
            ckpt_dir = Path(word.split("=", 1)[1])
    return defaults_source(ckpt_dir)
