"""What the learner's tools share on the command line."""

import argparse
from pathlib import Path

from ..tokenizer import REMOTE_TIMEOUT_S


def tool_parser(prog: str, description: str, with_prompt: bool = True) -> argparse.ArgumentParser:
    """The arguments every tool shares: an optional prompt, --ckpt-dir and --tokenizer."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if with_prompt:
        parser.add_argument("prompt", nargs="?", help="text to run (default: the model's default prompt)")
    parser.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: as run.py chooses)")
    parser.add_argument("--tokenizer", help="tokenizer.model file or URL (default: the one beside the checkpoint); "
                        f"a URL gets {REMOTE_TIMEOUT_S} s to answer")
    return parser
