"""What a training run keeps on disk between sessions: its state (to --resume bit-identically) and its log.

train_state.pt    fp32 weights, optimizer state, step, running loss, RNG state, the recipe and the tokenizer
train_log.jsonl   one JSON line per log interval (train loss) and per evaluation (validation loss)
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import UserError, notice
from ..files import atomic_path, read_text, write_failure, write_text
from .recipe import Recipe, TrainSettings

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def save_train_state(path: Path, recipe: Recipe, step: int, running: dict, weights: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, generator: torch.Generator, tokenizer_bytes: bytes) -> None:
    with atomic_path(path) as temporary:
        torch.save({
            "recipe": json.dumps(recipe.to_dict()), "step": step, "running": running,
            "weights": {k: w.detach().clone() for k, w in weights.items()},
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "tokenizer": torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8),
        }, temporary)


def load_train_state(path: Path, recipe: Recipe) -> dict:
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; start without --resume, or pass the --out of an interrupted run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files; all mean the same to the user
        raise UserError(f"--resume: {path} is not a readable training checkpoint ({type(err).__name__}); "
                        f"start again without --resume.") from None
    if not isinstance(state, dict) or "recipe" not in state:
        raise UserError(f"--resume: {path} is not a training checkpoint written by llama3_raw.train; start again without --resume.")
    if with_defaults(json.loads(state["recipe"])) != recipe.to_dict():
        raise UserError(f"--resume: {path} was trained with a different recipe than --config {recipe.source}; "
                        f"pass the recipe it was started with, or another --out.")
    return state


def with_defaults(saved_recipe: dict) -> dict:
    """A saved recipe with the train settings added since it was saved at their defaults (dropout: 0), which
    are the very settings it ran with."""
    if isinstance(saved_recipe.get("train"), dict):
        saved_recipe["train"] = {**asdict(TrainSettings()), **saved_recipe["train"]}
    return saved_recipe


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The log's records up to the checkpoint's step (lines written after it are replayed by the resumed run).

    A crash in the middle of append_log leaves a torn last line: it is dropped, with a notice (the resumed run
    writes it again). A line that is not a record anywhere else means the file was damaged: refused."""
    if not path.exists():
        return []
    fix = "restore the file, or delete it to resume without the earlier log lines"
    lines = [(number, line) for number, line in enumerate(read_text(path, "--resume:", fix).split("\n"), start=1)
             if line.strip()]
    records = []
    for number, line in lines:
        record = log_record(line)
        if record is None and number == lines[-1][0]:
            notice(f"note: dropped the torn last line {number} of {path} (a crash while it was written)")
        elif record is None:
            raise UserError(f"--resume: {path} line {number} is not a log record; {fix}.")
        else:
            records.append(record)
    return [r for r in records if r["step"] <= up_to_step]


def log_record(line: str) -> dict | None:
    """One log line as a record with its step, or None when it is not one."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        return None
    return record


def write_log(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_log(path: Path, record: dict) -> None:
    """One line more. A failed write (a full disk) is cut off again, so the file is as it was; a crash half-way
    leaves a torn last line, which read_log drops."""
    remaining = memoryview((json.dumps(record) + "\n").encode("utf-8"))
    try:
        with open(path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                while remaining:
                    remaining = remaining[f.write(remaining):]
            except OSError:
                f.truncate(start)
                raise
    except OSError as err:
        raise write_failure(path, err) from None
