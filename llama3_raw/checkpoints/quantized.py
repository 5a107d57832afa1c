"""Saved int8 and int4 weights: the folder `run.py --quantize int8|int4 --save-quantized DIR` writes, and
reading it back.

One torch.save'd dict of plain tensors (model.int8.pth or model.int4.pth) beside params.json and
tokenizer.model, so that it loads as Meta's files do (memory-mapped, weights_only=True). A quantized matrix
KEY is stored as
    int8: KEY (int8 values, (out, in)) and KEY.scales (one per row, (out,));
    int4: KEY (uint8, two 4-bit values a byte, (out, in/2)) and KEY.scales_and_zeros ((in/group, out, 2));
          the group size is in/group. The bytes are in the arrangement of the CPU kernel of the machine that
          saved them, named by the tensor int4_cpu_arrangement (BLOCK_N, halves; int4_layouts.py), so that
          a machine of the same kind maps them and multiplies from the file with no copy; elsewhere they
          are rearranged once at load. Without that tensor, the plain layout;
every other tensor under its own name.
"""

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_folder, check_new_folder, write_json
from ..params import ModelParams
from ..int4_layouts import BLOCK_CANDIDATES, cpu_block_rows, cpu_unpack, plain_from_values
from ..quantize import INT4_GROUP_SIZES, Int4Weight, Int8Weight, check_int4_shape, is_quantized_key

QUANTIZED_FILES = {"int8": "model.int8.pth", "int4": "model.int4.pth"}
SCALES_SUFFIX = {"int8": ".scales", "int4": ".scales_and_zeros"}
BYTES_PER_PARAMETER = {"int8": 1.0, "int4": 0.5}
CPU_ARRANGEMENT_KEY = "int4_cpu_arrangement"


def quantized_file(ckpt_dir: Path) -> tuple[str, Path] | None:
    """("int8" or "int4", the file) when the folder holds saved quantized weights."""
    return next(((scheme, ckpt_dir / name) for scheme, name in QUANTIZED_FILES.items() if (ckpt_dir / name).is_file()), None)


def quantized_state_dict(weights: dict, scheme: str) -> dict[str, torch.Tensor]:
    """The weight dict flattened to plain tensors for torch.save (see the module's text)."""
    int4_layouts = {w.layout for w in weights.values() if isinstance(w, Int4Weight)}
    if int4_layouts - {"plain", "cpu"} or ("cpu" in int4_layouts and cpu_block_rows() is None):
        raise UserError("--save-quantized writes int4 weights from the CPU, in an arrangement it knows; run it with "
                        "--device cpu (the saved folder then loads on CUDA too).")
    in_cpu_arrangement = int4_layouts == {"cpu"}
    state = {}
    for key, w in weights.items():
        if isinstance(w, Int8Weight):
            state[key], state[key + SCALES_SUFFIX[scheme]] = w.values.cpu(), w.scales.cpu()
        elif isinstance(w, Int4Weight):
            state[key] = w.packed if in_cpu_arrangement else w.plain().cpu()
            state[key + SCALES_SUFFIX[scheme]] = w.scales_and_zeros.cpu()
        else:
            state[key] = w.cpu()
    if scheme == "int4" and in_cpu_arrangement:
        state[CPU_ARRANGEMENT_KEY] = torch.tensor(cpu_block_rows())
    return state


def stored_arrangement(state: dict, path: Path, again: str) -> tuple[int, bool] | None:
    """The CPU arrangement the saved int4 bytes are in (removed from `state`), or None for the plain layout."""
    stored = state.pop(CPU_ARRANGEMENT_KEY, None)
    if stored is None:
        return None
    integers = isinstance(stored, torch.Tensor) and stored.numel() == 2 and not stored.is_floating_point()
    arrangement = tuple(stored.tolist()) if integers else None
    if arrangement not in BLOCK_CANDIDATES:  # saved as integers: (64, 1) == (64, True), (64, 2) is none of them
        raise UserError(f"{path}: {CPU_ARRANGEMENT_KEY} is none of the arrangements PyTorch's int4 kernels use; {again}.")
    return arrangement[0], bool(arrangement[1])


def expected_tensors(params: ModelParams, scheme: str, state: dict) -> dict[str, tuple[tuple, torch.dtype | None]]:
    """Every stored tensor's shape and dtype (None: any floating point) by params.json."""
    group_size = 1
    if scheme == "int4":  # read off the first matrix's scales and zeros: (dim/group_size, out, 2)
        first = state.get("layers.0.attention.wq.weight" + SCALES_SUFFIX["int4"])
        if isinstance(first, torch.Tensor) and first.dim() == 3 and first.shape[0] and params.dim % first.shape[0] == 0:
            group_size = params.dim // first.shape[0]
    expected = {}
    for key, (out_features, *rest) in params.weight_shapes().items():
        if not is_quantized_key(key):
            expected[key] = ((out_features, *rest), None)
        elif scheme == "int8":
            expected[key] = ((out_features, *rest), torch.int8)
            expected[key + SCALES_SUFFIX[scheme]] = ((out_features,), None)
        else:
            in_features = rest[0]
            expected[key] = ((out_features, in_features // 2), torch.uint8)
            expected[key + SCALES_SUFFIX[scheme]] = ((in_features // group_size, out_features, 2), None)
    return expected


def quantized_weights(state: dict[str, torch.Tensor], params: ModelParams, path: Path, scheme: str) -> dict:
    """A saved state dict (quantized_state_dict) checked key by key, as Int8Weight / Int4Weight matrices."""
    again = f"save the {scheme} weights again with run.py --quantize {scheme} --save-quantized"
    state = dict(state)
    arrangement = stored_arrangement(state, path, again) if scheme == "int4" else None
    expected = expected_tensors(params, scheme, state)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        example = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"{path} does not match its params.json ({example}); {again}.")
    for key, (shape, dtype) in expected.items():
        tensor = state[key]
        right_dtype = tensor.dtype == dtype if dtype is not None else tensor.is_floating_point()
        if tuple(tensor.shape) != shape or not right_dtype:
            raise UserError(f"{path}: {key} is {tuple(tensor.shape)} {tensor.dtype} where params.json implies "
                            f"{shape} {dtype or 'floating point'}; {again}.")
    weights = {}
    for key, tensor in state.items():
        if key.endswith(SCALES_SUFFIX[scheme]):
            continue
        scales = state.get(key + SCALES_SUFFIX[scheme])
        if scales is None:
            weights[key] = tensor
        elif scheme == "int8":
            weights[key] = Int8Weight(tensor, scales)
        else:
            weights[key] = int4_weight(tensor, scales, arrangement)
            group_size = weights[key].group_size
            problem = (f"its group size {group_size} is none of {', '.join(map(str, INT4_GROUP_SIZES))}"
                       if group_size not in INT4_GROUP_SIZES else check_int4_shape(weights[key].shape, group_size))
            if problem:
                raise UserError(f"{path}: {key} cannot be multiplied in int4: {problem}; {again}.")
    return weights


def int4_weight(stored: torch.Tensor, scales_and_zeros: torch.Tensor, arrangement: tuple[int, bool] | None) -> Int4Weight:
    """A saved int4 matrix: as mapped from the file when its bytes are in this machine's CPU arrangement,
    else in the plain layout (rearranged now, if saved in another machine's arrangement)."""
    in_features = stored.shape[1] * 2
    if arrangement is None:
        return Int4Weight(stored, scales_and_zeros, in_features)
    if arrangement == cpu_block_rows():  # (a file may hold a strided tensor; the kernel reads contiguous bytes)
        return Int4Weight(stored.contiguous(), scales_and_zeros, in_features, "cpu")
    values = cpu_unpack(stored.contiguous(), stored.shape[0], in_features, *arrangement)
    return Int4Weight(plain_from_values(values), scales_and_zeros, in_features)


def quantized_checkpoint_bytes(params: ModelParams, scheme: str, extra_bytes: int = 0) -> int:
    """About how many bytes save_quantized_checkpoint writes, by arithmetic: one byte (int8) or half a byte
    (int4) per parameter, two for the bfloat16 embeddings (not quantized), and for the scales (int4: a
    scale and a zero per 32 inputs at most), norms and the zip's own records."""
    per_parameter = BYTES_PER_PARAMETER[scheme] * (1.01 if scheme == "int8" else 1.26)
    return int(per_parameter * params.parameter_count() + 2 * params.vocab_size * params.dim) + extra_bytes


def save_quantized_checkpoint(weights: dict, params: ModelParams, scheme: str, tokenizer_path: Path, out_dir: Path,
                              extra_files: tuple[Path, ...] = ()) -> Path:
    """Write int8 or int4 weights as a checkpoint folder that run.py loads directly: params.json,
    tokenizer.model, the `extra_files` that exist (e.g. the source's generation.json) and the weights.

    Everything is written into a temporary folder beside `out_dir`, which is renamed into place at the
    end: an interrupted or failed save leaves nothing behind, and says why."""
    needed = quantized_checkpoint_bytes(params, scheme, tokenizer_path.stat().st_size)
    check_new_folder(out_dir, "--save-quantized", needed)
    with atomic_folder(out_dir, needed) as folder:
        write_json(folder / "params.json", params.to_json_dict())
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        for path in extra_files:
            if path.is_file():
                shutil.copyfile(path, folder / path.name)
        torch.save(quantized_state_dict(weights, scheme), folder / QUANTIZED_FILES[scheme])
    return out_dir
