"""What a training run keeps on disk between sessions: its state (to --resume bit-identically) and its log.

train_state.pt    fp32 weights, optimizer state, step, running loss, RNG state, the recipe and the tokenizer
train_log.jsonl   one JSON line per log interval (train loss) and per evaluation (validation loss)
"""

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_path, write_text
from .recipe import Recipe

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
    if json.loads(state["recipe"]) != recipe.to_dict():
        raise UserError(f"--resume: {path} was trained with a different recipe than --config {recipe.source}; "
                        f"pass the recipe it was started with, or another --out.")
    return state


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The log's records up to the checkpoint's step (lines written after it are replayed by the resumed run)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def write_log(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
