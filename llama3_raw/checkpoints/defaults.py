"""The settings a run takes when the user gives none: built-in ones, those a checkpoint carries in its
generation.json, and the compute dtype. The command line's flags are checked by the same value checks.
"""

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserError
from ..files import read_json
from ..quantize import QuantizedWeight
from ..threads import SMALL_MODEL_PARAMETERS
from .loading import GENERATION_DEFAULTS_FILE, count_parameters
from .gguf_quants import BlockTensor

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


def choose_dtype(requested: str, device: str, weights: dict, quantize: str = "none",
                 cpu_features: Mapping | None = None) -> tuple[torch.dtype, str]:
    """The compute dtype and why, in words for the user (run and chat print it on stderr).

    Int8 and int4 weights (quantized now, or saved so) always multiply bfloat16 activations; a dtype asked for
    is taken; "auto" on CUDA is bfloat16, on the CPU `auto_cpu_dtype`'s rule. `cpu_features`: as
    torch.cpu.get_capabilities() (the default), e.g. {"avx512_bf16": True} in a test.
    """
    if quantize != "none" or any(isinstance(w, QuantizedWeight) for w in weights.values()):
        return torch.bfloat16, "bfloat16: int8 and int4 weights multiply bfloat16 activations"
    if requested != "auto":
        return DTYPES[requested], f"{requested}, as asked (--dtype {requested})"
    if device == "cuda":
        return torch.bfloat16, "bfloat16 (auto): on CUDA, computed straight from the checkpoint's tensors"
    features = this_cpu() if cpu_features is None else cpu_features
    return auto_cpu_dtype(stored_dtype(weights), count_parameters(weights), native_bf16(features),
                          available_memory_bytes())


NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # torch.cpu.get_capabilities()'s names (/proc/cpuinfo: avx512_bf16, amx_bf16)


def this_cpu() -> Mapping:
    """This CPU's features as PyTorch detects them (none known with a torch that lacks torch.cpu.get_capabilities)."""
    return getattr(torch.cpu, "get_capabilities", dict)()


def native_bf16(cpu_features: Mapping) -> bool:
    """Whether a CPU with these features (torch.cpu.get_capabilities()) computes bfloat16 products natively:
    AVX-512 BF16 (which the compiled decode kernels also need, compiled.py) or AMX-BF16. Without them
    every bf16 weight is widened to float32 in software first."""
    return any(cpu_features.get(name) is True for name in NATIVE_BF16_FEATURES)


def stored_dtype(weights: dict) -> torch.dtype | None:
    """The dtype that holds most of the checkpoint's parameters (None for no tensors)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in {id(t): t for t in weights.values() if isinstance(t, (torch.Tensor, BlockTensor))}.values():
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()  # a GGUF block type: None, no dtype of its own
    return max(counts, key=lambda d: counts[d]) if counts else None


def auto_cpu_dtype(stored: torch.dtype | None, n_parameters: int, native: bool,
                   free_bytes: int) -> tuple[torch.dtype, str]:
    """--dtype auto on the CPU, for a checkpoint stored in `stored` with `n_parameters`, on a CPU that computes
    bf16 natively (`native`) and has `free_bytes` of memory available:

    - a float32 checkpoint: float32, its own dtype (memory-mapped, no copy);
    - a bf16 checkpoint, at least SMALL_MODEL_PARAMETERS, native bf16: bfloat16, straight from the mapped
      file -- half the bytes per token of float32 and no copy (docs/command-line.md measures it);
    - a smaller model: float32, the same tokens on every machine (a 5M model runs hundreds of tokens/s either way);
    - otherwise float32 where a float32 copy fits in half the free memory (as Meta's reference computes on
      the CPU), else bfloat16.
    """
    if stored == torch.float32:
        return torch.float32, "float32 (auto): the checkpoint's own dtype"
    is_bf16 = stored == torch.bfloat16
    if is_bf16 and native and n_parameters >= SMALL_MODEL_PARAMETERS:
        return torch.bfloat16, ("bfloat16 (auto): the checkpoint's own dtype, which this CPU computes natively "
                                "(AVX-512 BF16 or AMX); --dtype float32 for Meta's reference arithmetic")
    if 4 * n_parameters >= 0.5 * free_bytes:
        return torch.bfloat16, "bfloat16 (auto): a float32 copy would not fit in half the free memory"
    if is_bf16 and native:
        return torch.float32, (f"float32 (auto): a model under {SMALL_MODEL_PARAMETERS // 1_000_000}M parameters, "
                               f"the same tokens on every machine; --dtype bfloat16 is faster on this CPU")
    why = "this CPU has no native bfloat16 arithmetic" if is_bf16 else "the checkpoint is not bfloat16"
    return torch.float32, f"float32 (auto): {why}, and a float32 copy fits in memory"


def auto_dtype_help(cpu_features: Mapping | None = None) -> str:
    """--dtype auto's rule in a sentence, with what this CPU has (for --help; run and chat say what was chosen)."""
    features = this_cpu() if cpu_features is None else cpu_features
    here = "has" if native_bf16(features) else "lacks"
    return (f"auto: on the CPU, a bfloat16 checkpoint of {SMALL_MODEL_PARAMETERS // 1_000_000}M parameters or more "
            f"computes in bfloat16 where the CPU has native bf16 (AVX-512 BF16 or AMX; this CPU {here} it), "
            f"otherwise float32 when a float32 copy fits in half the free memory; a float32 checkpoint stays "
            f"float32; on CUDA bfloat16. The choice and why are printed on stderr")


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
