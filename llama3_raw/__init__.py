"""Llama 3 with raw tensors: Meta's checkpoint in a flat dict, a forward pass of small pure functions.

Read in this order: params.py (the config), model.py (the forward pass), tokenizer.py, generate.py (the
decode loop). Around them: kernels.py, compiled.py and quantize.py (how the matrix products run),
checkpoints/ (a folder in, verified weights out), chat.py (Meta's chat format), training/ (training from
scratch), tools/ (inspect, compare, score), and cli/ (the command lines; run.py and __main__.py call it).
"""

from .checkpoints import Checkpoint, cast_weights, load_checkpoint
from .errors import UserError
from .generate import Sampling, generate, sample_next_token
from .model import KVCache, forward, new_kv_cache
from .params import ModelParams, load_params, params_from_dict
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "Checkpoint", "KVCache", "ModelParams", "Sampling", "Tokenizer", "UserError", "cast_weights", "forward",
    "generate", "load_checkpoint", "load_params", "load_tokenizer", "new_kv_cache", "params_from_dict",
    "sample_next_token",
]
