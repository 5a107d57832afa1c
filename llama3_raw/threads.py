"""How many CPU threads the matrix kernels use when the user does not say (`--threads`).

Measured on a 2-core machine shared with other work (docs/command-line.md, "Threads"; bench/threads.py): a second
thread made the shipped 5M model's 256-token forward 20x slower (0.056 s -> 1.2 s) and its decode 35x
slower (242 -> 7 tok/s), and even a 160M model lost 4x, because a thread that has to wait for a busy core
stalls every step of every matrix product. Small models gain nothing from more threads even on idle cores
(each product is microseconds of work); big ones do, on cores that nothing else is using.
"""

import os

import torch

from .parallel import launched_ranks

SMALL_MODEL_PARAMETERS = 50_000_000  # below this, one thread: the per-product work is too small to share


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def idle_cores() -> int:
    """Usable cores minus those already busy (the last minute's load average), at least one."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this system (Windows)
        busy = 0
    return max(1, usable_cores() - busy)


def default_threads(n_parameters: int) -> int:
    """Under torchrun, the rank's share of the cores; otherwise one thread for a small model, and for a bigger
    one the cores that no other work keeps busy."""
    if launched_ranks() > 1:
        return threads_per_rank()
    return 1 if n_parameters < SMALL_MODEL_PARAMETERS else idle_cores()


def use_threads(requested: int | None, n_parameters: int) -> int:
    """Set torch's thread count (`requested`, or the default for a model this size) and return it."""
    threads = requested if requested is not None else default_threads(n_parameters)
    torch.set_num_threads(threads)
    return threads


def use_training_threads(requested: int | None) -> int:
    """Training multiplies a whole batch (thousands of tokens) at once: enough work to share at any model size,
    so the default is the cores other work leaves idle (under torchrun, the rank's share of the cores)."""
    threads = requested if requested is not None else threads_per_rank() if launched_ranks() > 1 else idle_cores()
    torch.set_num_threads(threads)
    return threads


def ranks_on_this_machine() -> int:
    """How many ranks torchrun started on this machine (its LOCAL_WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def threads_per_rank() -> int:
    """A rank's share of this machine's cores: ranks that together ask for more threads than there are cores
    stall each other at every collective."""
    return max(1, usable_cores() // ranks_on_this_machine())
