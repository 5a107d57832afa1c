"""`python -m llama3_raw [COMMAND] ...`: the same command line as the installed `llama3-raw` (cli/commands.py)."""

import sys

from .cli import main

sys.exit(main(prog="python -m llama3_raw"))
