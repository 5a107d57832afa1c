"""The one exception type that means "the user gave us something we cannot use", and the command lines' parser.

Anything raised as `UserError` is shown by the command line as a single sentence and exit code 2,
without a traceback: its message must name the file or flag at fault and say how to fix it. Flag errors
that argparse itself finds (a wrong type, an unknown flag) keep the same promise through `ArgumentParser`.
How a command runs, with its events (Ctrl-C, SIGTERM, a closed stdout), is events.run_tool.
"""

import argparse
import re
import sys


class UserError(Exception):
    """Bad input from the user (a file, a flag, a prompt); the message says what to do about it."""


def notice(message: str) -> None:
    """Something the user should know that is not an error (a conversion, a line dropped); stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), at most `limit` characters:
    what a one-sentence error quotes of a library's longer complaint."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


# argparse's own messages, each rewritten as one sentence that names the flag and the fix.
ARGPARSE_MESSAGES = [
    (r"argument (?P<flag>\S+?): invalid choice: '?(?P<value>.*?)'? \(choose from (?P<choices>.*)\)",
     "{flag} {value} is not one of {choices}; pass one of those"),
    (r"argument (?P<flag>\S+?): invalid (?P<kind>.+) value: '?(?P<value>.*?)'?",
     "{flag} {value} is not a {kind}; pass a {kind}"),
    (r"argument (?P<flag>\S+?): expected one argument", "{flag} needs a value; write {flag} VALUE"),
    (r"unrecognized arguments: (?P<words>[^-].*)",  # `run.py Once upon a time`: a prompt without quotes
     "{words}: more words than this command takes; put a prompt of several words in quotes"),
    (r"unrecognized arguments: (?P<flags>\S+)", "{flags} is not a flag here; drop it or check its spelling"),
    (r"unrecognized arguments: (?P<flags>.*)", "{flags} are not flags here; drop them or check their spelling"),
    (r"the following arguments are required: (?P<flags>[^,]+)", "{flags} is required; add it"),
    (r"the following arguments are required: (?P<flags>.*)", "{flags} are required; add them"),
    (r"ambiguous option: (?P<flag>\S+) could match (?P<matches>.*)", "{flag} is ambiguous ({matches}); spell it out"),
]


def one_sentence(message: str) -> str:
    """argparse's error message as one sentence with its fix, without the full stop (unknown shapes keep their text)."""
    for pattern, sentence in ARGPARSE_MESSAGES:
        match = re.fullmatch(pattern, message)
        if match:
            return sentence.format(**match.groupdict())
    return message.rstrip(".")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with every flag error in one line and exit code 2, no usage block (that is for --help)."""

    def error(self, message: str):
        print(f"error: {one_sentence(message)} (see {self.prog} --help).", file=sys.stderr)
        sys.exit(2)
