"""A checkpoint folder on disk -> a flat dict of tensors keyed by Meta's own names, every key and shape verified.

Three layouts are read, each by its own module, and all come out the same way (`Checkpoint`):
  Meta's         params.json + consolidated.00.pth (meta.py), or model-parallel shards 00..NN (shards.py)
  Hugging Face   config.json + model*.safetensors, renamed and un-permuted to Meta's (huggingface.py)
  saved int8/4   params.json + model.int8.pth or model.int4.pth, written by `run.py --quantize int8|int4
                 --save-quantized` (quantized.py)
  GGUF           one .gguf file (llama.cpp, Ollama, LM Studio), renamed to Meta's (gguf_checkpoint.py)
Everything is memory-mapped; only what must change (merged shards, Hugging Face's wq/wk) is copied.
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError
from ..parallel import SINGLE_PROCESS, Ranks
from ..params import ModelParams, load_params
from ..quantize import INT4_GROUP_SIZE, Int8Weight, QuantizedWeight, is_quantized_key, quantize_weights
from .huggingface import (INDEX_FILE, is_hf_checkpoint_dir, params_from_hf_config, read_config, read_hf_checkpoint,
                          safetensors_candidates)
from .heap import file_backed_ranges, hand_back_converted, return_freed_heap
from .gguf_checkpoint import gguf_path, open_gguf, read_gguf_checkpoint
from .gguf_quants import BlockTensor
from .quantized import QUANTIZED_FILES, quantized_file, quantized_weights
from .meta import PROGRESS_MIN_BYTES, check_weights, checkpoint_files, read_state_dict, warm_page_cache
from .safety import check_params_fit_files, folder_file_size, missing_folder
from .shards import keep_kv_heads_once, merge_shards, numbered_shards
from .slicing import check_rank_count, load_rank_files, rank_shapes, slice_whole

GENERATION_DEFAULTS_FILE = "generation.json"  # a checkpoint may carry its own defaults for run.py's settings
# Every file of a folder the loader may read, besides the weight files found by pattern.
FOLDER_FILES = ("params.json", "config.json", GENERATION_DEFAULTS_FILE, "tokenizer.model", "original/tokenizer.model",
                INDEX_FILE, *QUANTIZED_FILES.values())


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    params: ModelParams
    weights: dict[str, torch.Tensor]
    file_bytes: int
    tied_output: bool  # True when the file had no output.weight and the embeddings serve as output
    source_format: str = "meta"  # "meta" (consolidated.*.pth), "huggingface" (config.json + safetensors), "int8", "int4", "gguf"


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (
        ((path / "params.json").is_file() and (bool(checkpoint_files(path)) or quantized_file(path) is not None))
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


def check_folder_files(ckpt_dir: Path) -> None:
    """Every file of the folder that the loader may open is a regular file inside the folder (safety.py),
    checked before any of them is opened. The files a Hugging Face index names are checked when it is read."""
    weight_files = checkpoint_files(ckpt_dir) + safetensors_candidates(ckpt_dir)
    for path in [ckpt_dir / name for name in FOLDER_FILES] + weight_files:
        if os.path.lexists(path):
            folder_file_size(ckpt_dir, path)


def checkpoint_params(ckpt_dir: Path) -> ModelParams:
    """The model's params without reading the weights: params.json, or a Hugging Face config.json."""
    if (source := gguf_path(ckpt_dir)) is not None:
        return open_gguf(source)[1]
    check_folder_files(ckpt_dir)
    if is_hf_format(ckpt_dir):
        return params_from_hf_config(read_config(ckpt_dir / "config.json"), ckpt_dir / "config.json")
    return load_params(ckpt_dir / "params.json")


def load_checkpoint(ckpt_dir: str | Path, show_progress: bool = True, ranks: Ranks = SINGLE_PROCESS) -> Checkpoint:
    """Read a checkpoint directory in Meta's or Hugging Face's format, verify every key and shape,
    return the flat weight dict with Meta's names: the whole model, or a tensor-parallel rank's slice of it."""
    ckpt_dir = Path(ckpt_dir)
    if (source := gguf_path(ckpt_dir)) is not None:
        if ranks.world_size > 1:
            raise UserError(f"{source} is a GGUF file, which this project runs in one process; run it without "
                            f"torchrun, or pass Meta's or Hugging Face's checkpoint.")
        params, weights, file_bytes, tied_output = read_gguf_checkpoint(source)
        return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output,
                          source_format="gguf")
    if not ckpt_dir.is_dir():
        raise missing_folder(ckpt_dir)
    check_folder_files(ckpt_dir)
    if ranks.world_size > 1:
        return load_rank_slice(ckpt_dir, ranks, show_progress)
    if is_hf_format(ckpt_dir):
        params, weights, file_bytes, tied_output = read_hf_checkpoint(ckpt_dir)
        check_weights(weights, params, ckpt_dir)
        return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output,
                          source_format="huggingface")
    params = load_params(ckpt_dir / "params.json")
    if (saved := quantized_file(ckpt_dir)) is not None:
        scheme, path = saved
        weights = quantized_weights(opened_state_dict(path, params, show_progress), params, path, scheme)
        return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, False), path.stat().st_size, False, scheme)
    files = meta_files(ckpt_dir)
    file_bytes = sum(path.stat().st_size for path in files)
    if len(files) > 1:  # model-parallel shards (70B, 405B): merged into new full-size tensors
        check_params_fit_files(params, file_bytes, ckpt_dir / "params.json")
        weights = merge_shards(files, params, read_state_dict, show_progress and file_bytes >= PROGRESS_MIN_BYTES)
        tied_output = "output.weight" not in weights
        check_weights(weights, params, ckpt_dir / files[0].name)
        weights, params = keep_kv_heads_once(weights, params)
    else:
        path = files[0]
        weights = opened_state_dict(path, params, show_progress)
        tied_output = check_weights(weights, params, path)
    return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output)


def meta_files(ckpt_dir: Path) -> list[Path]:
    files = checkpoint_files(ckpt_dir)
    if not files:
        raise UserError(f"{ckpt_dir} has no consolidated.00.pth; put Meta's checkpoint file there or pass the right --ckpt-dir.")
    return numbered_shards(files)


def load_rank_slice(ckpt_dir: Path, ranks: Ranks, show_progress: bool) -> Checkpoint:
    """A tensor-parallel rank's slice: from its own shard file(s) when Meta's files are there, else cut out
    of the memory-mapped whole (one file, Hugging Face, saved int8 / int4)."""
    if is_hf_format(ckpt_dir) or quantized_file(ckpt_dir) is not None:
        check_rank_count(checkpoint_params(ckpt_dir), ranks.world_size, 1, ckpt_dir)  # before any weight is read
        whole = load_checkpoint(ckpt_dir, show_progress)
        weights = slice_whole(whole.weights, whole.params, ranks, copy=whole.source_format == "huggingface")
        return replace(whole, weights=in_meta_order(weights, whole.params, whole.tied_output))
    params = load_params(ckpt_dir / "params.json")
    files = meta_files(ckpt_dir)
    file_bytes = sum(path.stat().st_size for path in files)
    check_params_fit_files(params, file_bytes, ckpt_dir / "params.json")
    check_rank_count(params, ranks.world_size, len(files), ckpt_dir)  # before any weight is read
    weights = load_rank_files(files, params, ranks)
    tied_output = check_weights(weights, params, ckpt_dir / files[0].name, shapes=rank_shapes(params, ranks))
    return Checkpoint(ckpt_dir, params, in_meta_order(weights, params, tied_output), file_bytes, tied_output)


def opened_state_dict(path: Path, params: ModelParams, show_progress: bool) -> dict[str, torch.Tensor]:
    """One weight file memory-mapped, checked to be a readable archive and big enough for params.json (by
    arithmetic, before check_weights builds the shape table), then read once into the page cache."""
    state = read_state_dict(path)
    check_params_fit_files(params, path.stat().st_size, path.parent / "params.json")
    warm_page_cache(path, show_progress)
    return state


def in_meta_order(weights: dict[str, torch.Tensor], params: ModelParams, tied_output: bool) -> dict[str, torch.Tensor]:
    """The verified weights in Meta's key order; a tied output is the embedding tensor itself, not a copy."""
    ordered = {key: weights[key] for key in params.weight_shapes() if key in weights}
    if tied_output:
        ordered["output.weight"] = ordered["tok_embeddings.weight"]
    return ordered


def quantization(weights: dict) -> str | None:
    """"int8" or "int4" when the weight matrices are quantized, else None."""
    quantized = next((w for w in weights.values() if isinstance(w, QuantizedWeight)), None)
    return None if quantized is None else "int8" if isinstance(quantized, Int8Weight) else "int4"


def count_parameters(weights: dict[str, torch.Tensor]) -> int:
    """Distinct parameters: a tied output matrix is counted once."""
    return sum(t.numel() for t in {id(t): t for t in weights.values()}.values())


def conversion_note(weights: dict, dtype: torch.dtype, where: Path) -> str | None:
    """What casting `weights` to `dtype` converts, when it is more than the usual lossless bfloat16 -> float32
    (say float16 weights, or a checkpoint that mixes float32 and bfloat16 tensors)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in {id(t): t for t in weights.values() if isinstance(t, torch.Tensor)}.values():  # GGUF blocks: docs
        if tensor.dtype != dtype and not (tensor.dtype == torch.bfloat16 and dtype == torch.float32):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    if not counts:
        return None
    held = ", ".join(f"{n} {str(d).removeprefix('torch.')}" for d, n in counts.items())
    return f"note: {where} holds {held} tensor(s), converted to {str(dtype).removeprefix('torch.')}"


def cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device,
                 show_progress: bool = False, scheme: str = "none", group_size: int = INT4_GROUP_SIZE) -> dict:
    """Weights in the compute dtype on the compute device; tensors already there are kept as they are.

    Tied tensors stay tied: each distinct tensor is converted once. Int8 and int4 matrices stay so; their
    scales take the compute dtype (and int4 values the arrangement of the device's kernel). With `scheme`
    "int8" or "int4" the matrices that quantize_weights quantizes are quantized as soon as each is converted,
    so the converted copy of one matrix at a time exists beside the quantized weights, never of all of them
    (a GGUF's Q8_0 dequantized to bf16, an fp32 file cast to bf16).
    """
    converted: dict[int, torch.Tensor] = {}
    out = {}
    total_bytes = sum(t.nbytes for t in weights.values())
    file_ranges = file_backed_ranges()
    for key, tensor in tqdm(weights.items(), desc=f"to {dtype} on {device}", unit="tensor", leave=False,
                            disable=not show_progress or total_bytes < PROGRESS_MIN_BYTES):
        if scheme != "none" and is_quantized_key(key) and not isinstance(tensor, QuantizedWeight):
            matrix = converted[id(tensor)] if id(tensor) in converted else tensor.to(device=device, dtype=dtype)
            out[key] = quantize_weights({key: matrix}, dtype, scheme, group_size)[key]  # a tied output: its own copy
            hand_back_converted(file_view(tensor), out[key], file_ranges)  # a file's matrix: its pages are not read again
            matrix = None
            return_freed_heap()  # the matrix's cast copy and the quantizer's temporaries
            continue
        if id(tensor) not in converted:
            converted[id(tensor)] = tensor.to(device=device, dtype=dtype)
            hand_back_converted(file_view(tensor), converted[id(tensor)], file_ranges)
        out[key] = converted[id(tensor)]
    return out


def file_view(weight):
    """The tensor whose memory holds `weight` as it was read: a GGUF block tensor's bytes, or the weight itself."""
    return weight.raw if isinstance(weight, BlockTensor) else weight
