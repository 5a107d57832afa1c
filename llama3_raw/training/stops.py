"""How a training run ended, for the command line to report, and Ctrl-C (or SIGTERM, SIGHUP) turned into
"stop after this step"."""

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..parallel import Ranks
from .state import STATE_FILE


@dataclass(frozen=True)
class TrainingStop:
    """How a call to train() ended, for the command line to tell: where the state is and what is runnable."""

    reason: str  # "finished" (the recipe's last step), "stopped" (stop_after) or "interrupted" (a signal)
    step: int
    total_steps: int
    state_path: Path  # resumable state (fp32 weights, optimizer, RNG)
    exported_step: int | None  # the step of the model in Meta's format in out_dir; None: none exported yet
    next_export_step: int  # where the next evaluation (and export) comes
    last_val: dict | None
    log_records: int  # lines in train_log.jsonl
    signal: str | None = None  # "SIGINT" (Ctrl-C), "SIGTERM" or "SIGHUP" when interrupted


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, pre-emption (SLURM, Kubernetes), a closed terminal


class StopRequest:
    """Ctrl-C, SIGTERM or SIGHUP during the steps asks the loop to stop after the current step and save its
    state; a second signal has its usual effect again (events.run_tool's: the command ends at once). Only the
    main thread can catch signals, so elsewhere they keep their usual meaning; an ignored one (`nohup`'s
    SIGHUP) stays ignored."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self.request)
        return self

    def agreed(self, ranks: Ranks, device: str = "cpu") -> bool:
        """Whether to stop after this step: asked here or, under torchrun, on any rank (a signal reaches the ranks
        at different moments; they must stop after the same step, or one waits for the others forever)."""
        if ranks.world_size == 1:
            return self.requested
        asked = ranks.all_reduce(torch.tensor([float(self.requested), float(self.signum or 0)], dtype=torch.float64,
                                              device=device)).tolist()  # [ranks asked, sum of their signals]
        if asked[0] and self.signum is None:  # stopped for another rank: by its signal (the same on all, as a rule)
            self.signum = round(asked[1] / asked[0]) if asked[1] % asked[0] == 0 else signal.SIGTERM
        return asked[0] > 0

    def request(self, signum, _frame):
        self.signum = signum
        self.restore()

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __exit__(self, *_):
        self.restore()


def stop_report(run, reason: str, last_val: dict | None, signal_name: str | None = None) -> TrainingStop:
    """How `run` (a loop.TrainingRun) ended: the facts the command line reports."""
    settings = run.recipe.train
    exported = last_val["step"] if last_val and (run.out_dir / "consolidated.00.pth").is_file() else None
    next_export = min(settings.steps, (run.step // settings.eval_interval + 1) * settings.eval_interval)
    return TrainingStop(reason, run.step, settings.steps, run.out_dir / STATE_FILE, exported, next_export, last_val,
                        len(run.records), signal_name)
