"""A checkpoint on disk -> a flat dict of tensors keyed by Meta's own names.

Meta's checkpoint directory holds `params.json`, `consolidated.00.pth` (or several model-parallel
shards, see shards.py) and usually `tokenizer.model`. A single .pth file is opened memory-mapped with
`weights_only=True`: no pickled code can run, and the tensors are views of the file's pages, so the
weights live in memory once (as page cache) and a bf16 checkpoint computed in bf16 is never copied.
A Hugging Face directory (config.json + model*.safetensors) is handled by hf_checkpoint.py, and a folder
of int8 weights saved by `run.py --quantize int8 --save-quantized DIR` (model.int8.pth) is read the same
memory-mapped way into Int8Weight matrices (quantize.py).
"""

import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UserError
from .hf_checkpoint import is_hf_checkpoint_dir, params_from_hf_config, read_config, read_hf_checkpoint
from .params import ModelParams, load_params
from .quantize import (INT8_CHECKPOINT_FILE, SCALES_SUFFIX, Int8Weight, int8_state_dict, is_quantized_key,
                       weights_from_int8_state)
from .shards import merge_shards, numbered_shards

READ_CHUNK_BYTES = 64 << 20
PROGRESS_MIN_BYTES = 256 << 20  # smaller files load too fast for a progress bar to mean anything
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of pre-1.6 torch.save


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    params: ModelParams
    weights: dict[str, torch.Tensor]
    file_bytes: int
    tied_output: bool  # True when the file had no output.weight and the embeddings serve as output
    source_format: str = "meta"  # "meta" (consolidated.*.pth), "huggingface" (config.json + safetensors) or "int8"


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("consolidated.*.pth"))


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (
        ((path / "params.json").is_file() and (bool(checkpoint_files(path)) or (path / INT8_CHECKPOINT_FILE).is_file()))
        or is_hf_checkpoint_dir(path))


def is_hf_format(ckpt_dir: Path) -> bool:
    """Meta's params.json wins when a directory has both (a Hugging Face download's original/ is Meta's)."""
    return not (ckpt_dir / "params.json").is_file() and is_hf_checkpoint_dir(ckpt_dir)


def default_tokenizer_path(ckpt_dir: Path) -> Path:
    """tokenizer.model beside the weights, else in original/ (where a Hugging Face download keeps Meta's files)."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return ckpt_dir / "tokenizer.model"  # missing: the tokenizer loader says so


def checkpoint_params(ckpt_dir: Path) -> ModelParams:
    """The model's params without reading the weights: params.json, or a Hugging Face config.json."""
    if is_hf_format(ckpt_dir):
        return params_from_hf_config(read_config(ckpt_dir / "config.json"), ckpt_dir / "config.json")
    return load_params(ckpt_dir / "params.json")


def warm_page_cache(path: Path, show_progress: bool) -> None:
    """Read the file once, sequentially, so the memory-mapped tensors find its pages in the page cache.

    This is where the disk time goes, so this is where the progress bar is; the bytes read here land
    in the kernel's page cache, not in a second copy inside this process.
    """
    size = path.stat().st_size
    buffer = bytearray(min(READ_CHUNK_BYTES, max(size, 1)))
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
        disable=not show_progress or size < PROGRESS_MIN_BYTES, leave=False,
    ) as bar:
        while n := f.readinto(view):
            bar.update(n)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load, memory-mapped and restricted to plain tensors, with every failure turned into one sentence."""
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive whose directory sits at the end
        with open(path, "rb") as f:
            legacy = f.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
        if legacy:
            raise UserError(f"{path} was saved in PyTorch's legacy (non-zip) format, which cannot be memory-mapped; "
                            f"re-save it with a current torch.save.")
        raise UserError(f"{path} is truncated or corrupt (not a complete PyTorch zip archive); download it again.")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in str(err).lower() or "unsupported global" in str(err).lower():
            raise UserError(
                f"{path} holds Python objects other than plain tensors, which are refused because loading them "
                f"could run code; re-save it as a dict of tensors (torch.save(model.state_dict(), ...))."
            ) from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line}); download it again.") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is truncated or corrupt ({first_line}); download it again.") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a dict of tensors; point --ckpt-dir at Meta's consolidated checkpoint.")
    not_tensors = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise UserError(
            f"{path} holds entries that are not tensors ({', '.join(map(repr, not_tensors[:3]))}); "
            f"re-save it as a plain dict of name -> tensor."
        )
    return state


def check_weights(state: dict[str, torch.Tensor], params: ModelParams, path: Path) -> bool:
    """Every expected key with the shape params.json implies, nothing extra. Returns whether output is tied."""
    expected = params.weight_shapes()
    tied_output = "output.weight" not in state  # Llama 3.2 1B/3B share the embedding matrix with the output
    if tied_output:
        del expected["output.weight"]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) such as {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) such as {', '.join(extra[:3])}")
        raise UserError(
            f"{path} does not match its params.json ({'; '.join(parts)}); "
            f"make sure the weights and their params.json (or config.json) come from the same Llama 3 download."
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(state[key].shape)} but params.json implies {shape}; "
                f"make sure the weights and their params.json (or config.json) come from the same Llama 3 download."
            )
        if not state[key].is_floating_point():
            raise UserError(f"{path}: {key} has dtype {state[key].dtype}, not a floating-point type; download the checkpoint again.")
    return tied_output


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


def load_checkpoint(ckpt_dir: str | Path, show_progress: bool = True) -> Checkpoint:
    """Read a checkpoint directory in Meta's or Hugging Face's format, verify every key and shape,
    return the flat weight dict with Meta's names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist; pass --ckpt-dir with the folder holding params.json and consolidated.00.pth.")
    if is_hf_format(ckpt_dir):
        params, weights, file_bytes, tied_output = read_hf_checkpoint(ckpt_dir)
        check_weights(weights, params, ckpt_dir)
        return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output,
                          source_format="huggingface")
    params = load_params(ckpt_dir / "params.json")
    if (ckpt_dir / INT8_CHECKPOINT_FILE).is_file():
        path = ckpt_dir / INT8_CHECKPOINT_FILE
        warm_page_cache(path, show_progress)
        weights = int8_weights(read_state_dict(path), params, path)
        return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, False), path.stat().st_size, False, "int8")
    files = checkpoint_files(ckpt_dir)
    if not files:
        raise UserError(f"{ckpt_dir} has no consolidated.00.pth; put Meta's checkpoint file there or pass the right --ckpt-dir.")
    files = numbered_shards(files)
    file_bytes = sum(path.stat().st_size for path in files)
    if len(files) > 1:  # model-parallel shards (70B, 405B): merged into new full-size tensors
        weights = merge_shards(files, params, read_state_dict, show_progress and file_bytes >= PROGRESS_MIN_BYTES)
        tied_output = "output.weight" not in weights
        check_weights(weights, params, ckpt_dir / files[0].name)
    else:
        path = files[0]
        warm_page_cache(path, show_progress)
        weights = read_state_dict(path)
        tied_output = check_weights(weights, params, path)
    return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output)


def in_meta_order(weights: dict[str, torch.Tensor], params: ModelParams, tied_output: bool) -> dict[str, torch.Tensor]:
    """The verified weights in Meta's key order; a tied output is the embedding tensor itself, not a copy."""
    ordered = {key: weights[key] for key in params.weight_shapes() if key in weights}
    if tied_output:
        ordered["output.weight"] = ordered["tok_embeddings.weight"]
    return ordered


def is_int8(weights: dict) -> bool:
    return any(isinstance(w, Int8Weight) for w in weights.values())


def count_parameters(weights: dict[str, torch.Tensor]) -> int:
    """Distinct parameters: a tied output matrix is counted once."""
    return sum(t.numel() for t in {id(t): t for t in weights.values()}.values())


def cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device,
                 show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Weights in the compute dtype on the compute device; tensors already there are kept as they are.

    Tied tensors stay tied: each distinct tensor is converted once. Int8 matrices stay int8; their
    scales take the compute dtype.
    """
    converted: dict[int, torch.Tensor] = {}
    out = {}
    total_bytes = sum(t.nbytes for t in weights.values())
    for key, tensor in tqdm(weights.items(), desc=f"to {dtype} on {device}", unit="tensor", leave=False,
                            disable=not show_progress or total_bytes < PROGRESS_MIN_BYTES):
        if id(tensor) not in converted:
            converted[id(tensor)] = tensor.to(device=device, dtype=dtype)
        out[key] = converted[id(tensor)]
    return out


def check_new_folder(out_dir: Path, flag: str) -> None:
    """A folder about to be written must not hold anything yet: nothing already on disk is overwritten."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{flag} {out_dir} already exists and is not an empty folder; choose a new folder name.")


def save_int8_checkpoint(weights: dict, source_dir: Path, out_dir: Path, extra_files: tuple[str, ...] = ()) -> Path:
    """Write int8 weights as a checkpoint folder that run.py loads directly: params.json, tokenizer.model, the
    source's `extra_files` (e.g. generation.json) and model.int8.pth (written under a temporary name first)."""
    check_new_folder(out_dir, "--save-quantized")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = checkpoint_params(source_dir)
    (out_dir / "params.json").write_text(json.dumps(params.to_json_dict(), indent=2) + "\n")
    shutil.copyfile(default_tokenizer_path(source_dir), out_dir / "tokenizer.model")
    for name in extra_files:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
    temporary = out_dir / (INT8_CHECKPOINT_FILE + ".partial")
    torch.save(int8_state_dict(weights), temporary)
    os.replace(temporary, out_dir / INT8_CHECKPOINT_FILE)
    return out_dir
