"""The command lines: `llama3-raw` / `python -m llama3_raw` with its subcommands, and `run.py` (commands.py).

options.py holds the flags of run and chat; run_command.py and chat_command.py parse nothing and print
what the library does.
"""

from .commands import main, run_script_main

__all__ = ["main", "run_script_main"]
