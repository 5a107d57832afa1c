"""What the learner's tools share on the command line."""

import argparse
from pathlib import Path

from ..checkpoints.defaults import thread_count
from ..errors import ArgumentParser
from ..threads import SMALL_MODEL_PARAMETERS
from ..tokenizer import REMOTE_TIMEOUT_S


def add_common_arguments(parser: argparse.ArgumentParser, with_prompt: bool = True) -> None:
    """The arguments every tool shares: an optional prompt, --ckpt-dir, --tokenizer and --threads."""
    if with_prompt:
        parser.add_argument("prompt", nargs="?", help="text to run (default: the checkpoint's default prompt)")
    parser.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: as the run command chooses)")
    parser.add_argument("--tokenizer", help="tokenizer.model file or URL (default: the one beside the checkpoint); "
                        f"a URL gets {REMOTE_TIMEOUT_S} s to answer")
    parser.add_argument("--threads", type=thread_count, help=f"CPU threads (default: 1 for a model under "
                        f"{SMALL_MODEL_PARAMETERS // 1_000_000}M parameters, else the cores other work leaves idle)")


def tool_main(module, argv: list[str] | None = None) -> int:
    """A tool run on its own (`python -m llama3_raw.tools.score`): its docstring, its arguments, its run."""
    parser = ArgumentParser(prog=f"python -m {module.__name__}", description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
