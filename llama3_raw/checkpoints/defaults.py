"""The settings a run takes when the user gives none: built-in ones, those a checkpoint carries in its
generation.json, and the compute dtype. The command line's flags are checked by the same value checks.
"""

from pathlib import Path

import torch

from ..errors import UserError
from ..files import read_json
from ..quantize import QuantizedWeight
from .loading import GENERATION_DEFAULTS_FILE, count_parameters

FORTY_TWO_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
BUILTIN_DEFAULTS = {"prompt": FORTY_TWO_PROMPT, "max_new_tokens": 32, "temperature": 0.0, "top_p": 0.9, "top_k": 0}
CHAT_MAX_NEW_TOKENS = 1024  # a chat reply's default limit; the reply normally ends at <|eot_id|> long before
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


INT64_MAX = 2**63 - 1  # torch takes integers as int64: a bigger one raises an overflow deep inside it
MIN_TEMPERATURE = 1e-6  # logits / a smaller temperature overflow float32 to inf, and softmax to NaN
MAX_THREADS = 1024


def integer_in(low: int, high: int, name: str):
    """An argparse `type=` (and generation.json check) for an integer in low..high; argparse names the
    expected kind of value from the function's name in its one-line error."""
    def check(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError
        return value

    check.__name__ = name
    return check


positive_int = integer_in(1, INT64_MAX, "positive integer")
non_negative_int = integer_in(0, INT64_MAX, "non-negative integer")
seed = integer_in(0, INT64_MAX, "seed (an integer from 0 to 2**63-1)")
thread_count = integer_in(1, MAX_THREADS, f"thread count (1 to {MAX_THREADS})")


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def temperature(text: str) -> float:
    value = non_negative_float(text)
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError
    return value


def fraction(text: str) -> float:
    return probability(text)


non_negative_float.__name__ = "non-negative number"
temperature.__name__ = f"temperature of 0 (greedy) or at least {MIN_TEMPERATURE:g}"
probability.__name__ = "probability in (0, 1]"
fraction.__name__ = "fraction in (0, 1]"

GENERATION_CHECKS = {"prompt": str, "max_new_tokens": positive_int, "temperature": temperature,
                     "top_p": probability, "top_k": non_negative_int,
                     "context_len": positive_int,  # the context the model was trained for, if shorter than its family's
                     "instruct": bool}  # false: a base model, which a chat would only confuse (run.py warns)


def is_valid_setting(key: str, value) -> bool:
    """Whether generation.json's `value` for `key` is one the matching flag would accept, with the same type."""
    if GENERATION_CHECKS.get(key) is bool:
        return isinstance(value, bool)
    if key not in GENERATION_CHECKS or isinstance(value, bool):
        return False
    try:
        return GENERATION_CHECKS[key](str(value)) == value
    except ValueError:
        return False


def generation_file_settings(ckpt_dir: Path) -> dict:
    """What the checkpoint's generation.json sets (nothing without one), every value checked."""
    path = ckpt_dir / GENERATION_DEFAULTS_FILE
    if not path.exists():  # anything else there (a folder, a FIFO) is refused by read_json
        return {}
    fix = f"fix or delete it (an object with only {', '.join(GENERATION_CHECKS)})"
    raw = read_json(path, fix, expect=dict)
    problem = generation_problem(raw)
    if problem:
        raise UserError(f"{path} is not a valid generation.json ({problem}); {fix}.")
    return raw


def generation_problem(settings: dict) -> str | None:
    """The first generation setting that run.py could not use, as "key: value"; None if all are fine."""
    return next((f"{key}: {value!r}" for key, value in settings.items() if not is_valid_setting(key, value)), None)


def generation_defaults(ckpt_dir: Path) -> dict:
    """Built-in defaults, overridden by the checkpoint's generation.json (e.g. a Shakespeare prompt)."""
    return BUILTIN_DEFAULTS | generation_file_settings(ckpt_dir)


def compute_dtype(requested: str, device: str, weights: dict, quantize: str = "none") -> torch.dtype:
    """The dtype activations are computed in. `requested`: "auto", "float32" or "bfloat16".

    auto: float32 on the CPU when a float32 copy fits comfortably in memory (Meta's reference computes in
    float32 there); otherwise, and on CUDA, bfloat16, computed straight from the checkpoint's tensors.
    Int8 and int4 weights (quantized now, or saved so) always multiply bfloat16 activations.
    """
    if quantize != "none" or any(isinstance(w, QuantizedWeight) for w in weights.values()):
        return torch.bfloat16
    if requested != "auto":
        return DTYPES[requested]
    if device == "cuda":
        return torch.bfloat16
    return torch.float32 if 4 * count_parameters(weights) < 0.5 * available_memory_bytes() else torch.bfloat16


def refuse_float32_with_quantized(requested: str, what: str) -> None:
    """The one refusal of a float32 request for int8 / int4 weights; `what` says where they come from."""
    if requested == "float32":
        raise UserError(f"{what}; drop --dtype float32.")


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
