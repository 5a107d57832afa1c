"""`llama3-raw` / `python -m llama3_raw`: one command line with a subcommand per tool, and `run.py`.

    llama3-raw [run] [PROMPT] ...      complete a prompt (the command when the first word names none;
                                       a lowercase word close to a name is refused as a typo)
    llama3-raw chat ...                chat with an Instruct model
    llama3-raw inspect | compare | score ...

Each subcommand has its own --help; `run.py` is the `run` command alone, as the README first shows it.
"""

import argparse
import difflib
import json
import sys
import textwrap

from ..errors import ArgumentParser
from ..events import run_tool
from ..parallel import as_one_of, join_ranks
from ..tools import compare, inspection, score
from ..version import __version__
from .chat_command import run_chat
from .options import add_chat_command_arguments, add_run_arguments, epilog, source_for
from .run_command import run

DESCRIPTION = "Llama 3 written with raw tensors: complete a prompt, chat, and look inside the model."
TOOLS = {"inspect": inspection, "compare": compare, "score": score}  # each: __doc__, add_arguments, run
COMMAND_SUMMARIES = {
    "run": "complete a prompt (the command when the first word is none of these, nor a slip for one)",
    "chat": "chat with an Instruct model: one message per line, or one reply with --message",
    "inspect": "look inside one forward pass: logit lens, attention maps, shapes",
    "compare": "this project's forward pass against Meta's reference, block by block",
    "score": "perplexity and nats per character of a text file",
}
HELP_WORDS = ("-h", "--help", "--version")
TYPO_SIMILARITY = 0.75  # difflib's ratio: one slip in a 4-letter name (chta) and up; compile/compare (0.71) is not
TYPO_RULE = ("A first word that is one lowercase word (letters only) close to a command's name or the start of "
             "one, such as insepct or insp, "
             "is taken for a mistyped command and refused with the name it resembles; any other first word (a "
             "phrase in quotes, a word with capitals, digits or punctuation) is a prompt. To complete such a word, "
             "name the command: {prog} run insepct.")


def print_result(args: argparse.Namespace, result) -> None:
    if args.json and isinstance(result, list):  # --prompts-file: JSON lines, one object per prompt
        for item in result:
            print(json.dumps(item))
    elif args.json:
        print(json.dumps(result))


def generate_main(args: argparse.Namespace) -> int:
    """`run` and `chat`: UserErrors become one line and exit code 2. Under torchrun every rank runs this,
    on its slice of the model (parallel.py); rank 0 alone prints, every rank states its own error."""
    def work():
        args.ranks, args.device = join_ranks(args.device)  # without torchrun: one process, nothing joined
        with as_one_of(args.ranks):
            print_result(args, run_chat(args) if args.chat else run(args))

    return run_tool(work)


def build_parser(prog: str, argv: list[str]) -> ArgumentParser:
    source = source_for(argv)
    parser = ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=f"With no COMMAND, {prog} runs `run`: `{prog} \"ROMEO:\"` = `{prog} run \"ROMEO:\"`.\n"
                            f"{textwrap.fill(TYPO_RULE.format(prog=prog), 100)}\n"
                            f"Each command has its own help: {prog} COMMAND --help.")
    parser.add_argument("--version", action="version", version=f"llama3_raw {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name, summary in COMMAND_SUMMARIES.items():
        tool = TOOLS.get(name)
        sub = commands.add_parser(name, help=summary, description=tool.__doc__ if tool else summary + ".",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=epilog(f"{prog} run", prog, source) if name == "run" else None)
        sub.add_argument("--version", action="version", version=f"llama3_raw {__version__}")
        if tool:
            tool.add_arguments(sub)
            sub.set_defaults(main=tool.run, parser=sub)
        else:
            (add_run_arguments if name == "run" else add_chat_command_arguments)(sub, source)
            sub.set_defaults(main=generate_main, parser=sub)
    return parser


def mistyped_command(word: str) -> str | None:
    """The command `word` looks like a slip for, or None when it reads as a prompt (TYPO_RULE): a lowercase
    word of letters only that is close to a command's name, or the start (3 letters or more) of only one."""
    if word in COMMAND_SUMMARIES or not (word.isascii() and word.isalpha() and word.islower()):
        return None
    close = difflib.get_close_matches(word, COMMAND_SUMMARIES, n=1, cutoff=TYPO_SIMILARITY)
    starts = [name for name in COMMAND_SUMMARIES if len(word) >= 3 and name.startswith(word)]
    return close[0] if close else starts[0] if len(starts) == 1 else None


def main(argv: list[str] | None = None, prog: str = "llama3-raw") -> int:
    """The `llama3-raw` console command (and `python -m llama3_raw`): a subcommand, or `run` when none is named."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog, argv)
    if argv and (command := mistyped_command(argv[0])):
        parser.error(f"{argv[0]} is not a command (did you mean {command}?); write {prog} {command}, or to "
                     f"complete {argv[0]} as a prompt, {prog} run {argv[0]}")
    if not argv or (argv[0] not in COMMAND_SUMMARIES and argv[0] not in HELP_WORDS):
        argv = ["run", *argv]
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, whose --help lists the flags it takes
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.main(args)


def run_script_main(argv: list[str] | None = None) -> int:
    """`python run.py [PROMPT] ...`: the run command alone, under run.py's own name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    source = source_for(argv)
    parser = ArgumentParser(prog="run.py", description="Complete a prompt with a Llama 3 checkpoint, written with raw "
                            "tensors.", formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=epilog("python run.py", "python -m llama3_raw", source))
    parser.add_argument("--version", action="version", version=f"llama3_raw {__version__}")
    add_run_arguments(parser, source)
    return generate_main(parser.parse_args(argv))
