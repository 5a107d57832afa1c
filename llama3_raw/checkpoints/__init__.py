"""Checkpoints: a folder in, verified weights + params + tokenizer out.

    folder = open_folder(ckpt_dir)          # params, tokenizer, generation defaults: cheap, checked first
    model = load_model(folder, dtype="auto") # the weights, every key and shape verified, in the compute dtype

Meta's consolidated.NN.pth (meta.py, shards.py), Hugging Face safetensors folders (huggingface.py) and
saved int8 and int4 weights (quantized.py) all come out as one flat dict with Meta's key names (loading.py).
"""

from .defaults import DTYPES, generation_defaults
from .folder import (CheckpointFolder, DefaultsSource, Model, check_quantize_request, defaults_source, load_model,
                     open_folder, open_model)
from .places import SHIPPED_MODEL, WEIGHTS_ENV, find_default_checkpoint, is_shipped_model
from .loading import Checkpoint, cast_weights, count_parameters, default_tokenizer_path, load_checkpoint

__all__ = [
    "DTYPES", "SHIPPED_MODEL", "WEIGHTS_ENV", "Checkpoint", "CheckpointFolder", "DefaultsSource", "Model",
    "cast_weights", "check_quantize_request", "count_parameters", "default_tokenizer_path", "defaults_source",
    "find_default_checkpoint", "generation_defaults", "is_shipped_model", "load_checkpoint", "load_model",
    "open_folder", "open_model",
]
