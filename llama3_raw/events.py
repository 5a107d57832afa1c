"""How every command line runs its work (run_tool), and the events that can end it while it runs.

    UserError           one line "error: ...", exit code 2
    Ctrl-C              one line (what happens now), 130; its KeyboardInterrupt runs every `finally` on the way
    SIGTERM, SIGHUP     one line naming the signal, 143 or 129 (128 + the signal, as a shell reports a process the
                        signal ended), at once: the temporary files being written are removed (files.IN_FLIGHT)
                        and the process exits, so no output is ever half-written, and a signal that comes in the
                        middle of an import or a C extension cannot turn into a crash
    a closed stdout     (`| head`, once head has read its lines) quiet, 141, as `yes | head` ends: what is still
                        to print goes to /dev/null, as Python's documentation advises for SIGPIPE

Training takes SIGTERM and SIGHUP as it takes the first Ctrl-C (training/stops.py): finish the step, save, say
so, exit 143 or 129. Schedulers (SLURM, Kubernetes, `timeout`) send SIGTERM before they stop a job.
"""

import contextlib
import os
import signal
import sys
import threading

from .errors import UserError
from .files import remove_in_flight

ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE  # 141


def run_tool(work, interrupted: str = "interrupted") -> int:
    """Run a command-line tool's body `work()` and return its exit code (see the module's docstring);
    `interrupted` says what happens now when Ctrl-C, SIGTERM or SIGHUP ends it."""
    try:
        with signals_end_at_once(interrupted):
            work()
            sys.stdout.flush()  # a reader that left shows here, not as a complaint at the interpreter's exit
    except UserError as err:
        say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        say(f"\n{interrupted}")
        return 130
    except BrokenPipeError:
        stdout_gone()
        return BROKEN_PIPE_EXIT
    return 0


@contextlib.contextmanager
def signals_end_at_once(interrupted: str):
    """Inside, SIGTERM and SIGHUP end the process at once (end_now). Only the main thread can set handlers;
    elsewhere, and for a signal that is ignored (`nohup` ignores SIGHUP), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, lambda signum, _frame: end_now(signum, interrupted))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def end_now(signum: int, interrupted: str) -> None:
    """Remove what is half-written, put out what was printed, say `interrupted` and the signal, exit 128 + signum.
    os.write and os._exit: nothing here waits on a lock that the interrupted code may hold."""
    remove_in_flight()
    with contextlib.suppress(Exception):  # the interrupted code may have been printing: then that line is lost
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), f"\n{interrupted} ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


def say(message: str) -> None:
    """A last line on stderr, even where stderr has gone too (a closed terminal): then nothing is said."""
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def stdout_gone() -> None:
    """The reader of stdout (or of stderr, with `2>&1 | head`) went away: what is still buffered, and whatever
    else would be printed, goes to /dev/null, so the exit is quiet, without "Exception ignored ... BrokenPipeError"."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
