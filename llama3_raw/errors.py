"""The one exception type that means "the user gave us something we cannot use".

Anything raised as `UserError` is shown by the command line as a single sentence and exit code 2,
without a traceback: its message must name the file or flag at fault and say how to fix it.
"""

import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag, a prompt); the message says what to do about it."""


def notice(message: str) -> None:
    """Something the user should know that is not an error (a conversion, a line dropped); stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def run_tool(work, interrupted: str = "interrupted") -> int:
    """Run a command-line tool's body: a UserError becomes one line on stderr and exit code 2;
    Ctrl-C prints `interrupted` (what happens now) and exit code 130."""
    try:
        work()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    return 0
