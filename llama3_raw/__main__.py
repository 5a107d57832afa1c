"""`python -m llama3_raw [PROMPT] ...` completes a prompt, as run.py does; a first word picks another tool:
`inspect` (logit lens, attention maps, shapes), `compare` (against Meta's reference), `score` (perplexity),
`chat` (the same as run.py --chat)."""

import sys

TOOLS = {"inspect": "tools.inspection", "compare": "tools.compare", "score": "tools.score"}


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(f"llama3_raw.{TOOLS[argv[0]]}").main(argv[1:])
    from .cli import main

    if argv and argv[0] == "chat":
        argv = ["--chat", *argv[1:]]
    return main(argv)


sys.exit(dispatch(sys.argv[1:]))
