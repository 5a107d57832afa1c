"""Saved int8 weights: the folder `run.py --quantize int8 --save-quantized DIR` writes, and reading it back.

One torch.save'd dict of plain tensors (model.int8.pth) beside params.json and tokenizer.model, so that it
loads as Meta's files do (memory-mapped, weights_only=True). A quantized matrix KEY is stored as KEY (int8
values) and KEY + ".scales" (one per row); every other tensor under its own name.
"""

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_folder, check_new_folder, write_json
from ..params import ModelParams
from ..quantize import Int8Weight, is_quantized_key

INT8_CHECKPOINT_FILE = "model.int8.pth"
SCALES_SUFFIX = ".scales"


def int8_state_dict(weights: dict) -> dict[str, torch.Tensor]:
    """The weight dict flattened to plain tensors for torch.save (see INT8_CHECKPOINT_FILE)."""
    state = {}
    for key, w in weights.items():
        if isinstance(w, Int8Weight):
            state[key], state[key + SCALES_SUFFIX] = w.values.cpu(), w.scales.cpu()
        else:
            state[key] = w.cpu()
    return state


def weights_from_int8_state(state: dict[str, torch.Tensor]) -> dict:
    """The inverse of int8_state_dict: KEY + KEY.scales become one Int8Weight; shapes are checked by the loader."""
    return {key: Int8Weight(tensor, state[key + SCALES_SUFFIX]) if is_quantized_key(key) else tensor
            for key, tensor in state.items() if not key.endswith(SCALES_SUFFIX)}


def int8_weights(state: dict[str, torch.Tensor], params: ModelParams, path: Path) -> dict:
    """A saved int8 state dict (quantize.int8_state_dict) checked key by key, as Int8Weight matrices."""
    expected = {}
    for key, shape in params.weight_shapes().items():
        expected[key] = (shape, torch.int8 if is_quantized_key(key) else None)
        if is_quantized_key(key):
            expected[key + SCALES_SUFFIX] = ((shape[0],), None)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        example = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"{path} does not match its params.json ({example}); save the int8 weights again with "
                        f"run.py --quantize int8 --save-quantized.")
    for key, (shape, dtype) in expected.items():
        tensor = state[key]
        right_dtype = tensor.dtype == dtype if dtype is not None else tensor.is_floating_point()
        if tuple(tensor.shape) != shape or not right_dtype:
            raise UserError(f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype} where params.json implies "
                            f"{shape} {dtype or 'floating point'}; save the int8 weights again with run.py --quantize "
                            f"int8 --save-quantized.")
    return weights_from_int8_state(state)


def int8_checkpoint_bytes(params: ModelParams, extra_bytes: int = 0) -> int:
    """About how many bytes save_int8_checkpoint writes, by arithmetic: one byte per parameter, two for the
    bfloat16 embeddings (not quantized), 1 % for the scales, norms and the zip's own records."""
    return int(1.01 * (params.parameter_count() + params.vocab_size * params.dim)) + extra_bytes


def save_int8_checkpoint(weights: dict, params: ModelParams, tokenizer_path: Path, out_dir: Path,
                         extra_files: tuple[Path, ...] = ()) -> Path:
    """Write int8 weights as a checkpoint folder that run.py loads directly: params.json, tokenizer.model,
    the `extra_files` that exist (e.g. the source's generation.json) and model.int8.pth.

    Everything is written into a temporary folder beside `out_dir`, which is renamed into place at the
    end: an interrupted or failed save leaves nothing behind, and says why."""
    needed = int8_checkpoint_bytes(params, tokenizer_path.stat().st_size)
    check_new_folder(out_dir, "--save-quantized", needed)
    with atomic_folder(out_dir, needed) as folder:
        write_json(folder / "params.json", params.to_json_dict())
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        for path in extra_files:
            if path.is_file():
                shutil.copyfile(path, folder / path.name)
        torch.save(int8_state_dict(weights), folder / INT8_CHECKPOINT_FILE)
    return out_dir
