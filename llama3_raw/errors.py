"""The one exception type that means "the user gave us something we cannot use".

Anything raised as `UserError` is shown by the command line as a single sentence and exit code 2,
without a traceback: its message must name the file or flag at fault and say how to fix it.
"""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a prompt); the message says what to do about it."""
