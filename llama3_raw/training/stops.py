"""How a training run ended, for the command line to report, and Ctrl-C turned into "stop after this step"."""

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from .state import STATE_FILE


@dataclass(frozen=True)
class TrainingStop:
    """How a call to train() ended, for the command line to tell: where the state is and what is runnable."""

    reason: str  # "finished" (the recipe's last step), "stopped" (stop_after) or "interrupted" (Ctrl-C)
    step: int
    total_steps: int
    state_path: Path  # resumable state (fp32 weights, optimizer, RNG)
    exported_step: int | None  # the step of the model in Meta's format in out_dir; None: none exported yet
    next_export_step: int  # where the next evaluation (and export) comes
    last_val: dict | None
    log_records: int  # lines in train_log.jsonl


class StopRequest:
    """Ctrl-C during the steps asks the loop to stop after the current step and save its state; a second one
    stops at once. Only the main thread can catch signals, so elsewhere Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, _signum, _frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stop_report(run, reason: str, last_val: dict | None) -> TrainingStop:
    """How `run` (a loop.TrainingRun) ended: the facts the command line reports."""
    settings = run.recipe.train
    exported = last_val["step"] if last_val and (run.out_dir / "consolidated.00.pth").is_file() else None
    next_export = min(settings.steps, (run.step // settings.eval_interval + 1) * settings.eval_interval)
    return TrainingStop(reason, run.step, settings.steps, run.out_dir / STATE_FILE, exported, next_export, last_val,
                        len(run.records))
