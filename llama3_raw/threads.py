"""How many CPU threads the matrix kernels use when the user does not say (`--threads`).

Measured on a 2-core machine shared with other work (docs/command-line.md, "Threads"; bench/threads.py): a second
thread made the shipped 5M model's 256-token forward 20x slower (0.056 s -> 1.2 s) and its decode 35x
slower (242 -> 7 tok/s), and even a 160M model lost 4x, because a thread that has to wait for a busy core
stalls every step of every matrix product. Small models gain nothing from more threads even on idle cores
(each product is microseconds of work); big ones do, on cores that nothing else is using.

"Busy" is what the cores do now: a 0.1 s sample of /proc/stat, less this process's own time. The load
average, used before, lags by a minute: right after any heavy command (this project's own last run
included) it still counted a core as busy, and the default took 1 thread on 2 idle cores, half the speed.
"""

import os
import time

import torch

from .parallel import launched_ranks

SMALL_MODEL_PARAMETERS = 50_000_000  # below this, one thread: the per-product work is too small to share


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers set), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


SAMPLE_S = 0.1  # how long busy_cores looks: 10 clock ticks per core, enough to tell a busy core from an idle one
BUSY_FROM = 0.5  # a core's worth of other work from this much up counts as a busy core
IDLE_FIELDS = (3, 4)  # idle and iowait, of /proc/stat's user nice system idle iowait irq softirq steal (guest: in user)


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def read_proc_stat() -> str | None:
    try:
        with open("/proc/stat") as f:
            return f.read()
    except OSError:  # not on Linux
        return None


def cpu_ticks(stat_text: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, all) clock ticks since boot of the cores in `cpus`, from the text of /proc/stat."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(x) for x in fields[:8]]  # guest time is counted in user already
            total += sum(ticks)
            busy += sum(ticks) - sum(ticks[i] for i in IDLE_FIELDS)
    return busy, total


def busy_between(before: str, after: str, cpus: set[int], own_cpu_s: float = 0.0, wall_s: float = SAMPLE_S) -> float:
    """How many of `cpus` other work kept busy between two readings of /proc/stat, in cores (0.0 .. len(cpus)):
    all busy ticks, less the `own_cpu_s` seconds this process ran in the `wall_s` between them."""
    busy_0, total_0 = cpu_ticks(before, cpus)
    busy_1, total_1 = cpu_ticks(after, cpus)
    if total_1 <= total_0:
        return 0.0
    cores = len(cpus) * (busy_1 - busy_0) / (total_1 - total_0)
    return min(float(len(cpus)), max(0.0, cores - own_cpu_s / wall_s))


def busy_cores(seconds: float = SAMPLE_S) -> float:
    """The usable cores that other processes keep busy now, over a `seconds` sample; 0.0 where there is no
    /proc/stat to read (then the default is the affinity alone, as PyTorch's own)."""
    before = read_proc_stat()
    if before is None:
        return 0.0
    own_0, t_0 = own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    after = read_proc_stat()
    own_1, t_1 = own_cpu_s(), time.perf_counter()
    return busy_between(before, after or before, usable_cpus(), own_1 - own_0, t_1 - t_0)


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def idle_cores(busy: float | None = None) -> int:
    """Usable cores minus those other work keeps busy now (`busy`, in cores; default: a short sample), at least one."""
    busy = busy_cores() if busy is None else busy
    return max(1, usable_cores() - int(busy + 1 - BUSY_FROM))


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
