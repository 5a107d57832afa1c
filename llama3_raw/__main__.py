"""`python -m llama3_raw [PROMPT] ...` completes a prompt, as run.py does; a first word picks another tool:
`inspect` (logit lens, attention maps, shapes), `compare` (against Meta's reference), `score` (perplexity),
`chat` (the same as run.py --chat)."""

import sys

from . import cli
from .tools import compare, inspection, score

TOOLS = {"inspect": inspection.main, "compare": compare.main, "score": score.main}


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]](argv[1:])
    if argv and argv[0] == "chat":
        argv = ["--chat", *argv[1:]]
    return cli.main(argv)


sys.exit(dispatch(sys.argv[1:]))
