"""Weight-only int8 and int4: each weight matrix stored in fewer bits, activations in the compute dtype.

## int8: int8 values and one scale per output row

Decoding a token reads every weight once, so its speed is set by the bytes of weights read per
token. Int8 halves that against bf16. Row r of a matrix W (out, in) becomes

    scale[r] = max_j |W[r, j]| / 127        values[r, j] = round(W[r, j] / scale[r])  in -127..127

and W[r, j] is approximately values[r, j] * scale[r], off by at most half a step, scale[r] / 2.
Activations stay in the compute dtype (bf16); only the stored weights are int8.

`kernels.int8_matmul` computes x @ (values * scale[:, None]).T without building that bf16 matrix: for a single
row of activations (decoding) PyTorch's `_weight_int8pack_mm` CPU kernel reads the int8 bytes and
converts them in registers; for many rows (a prompt) it is faster to dequantize the matrix and use
the ordinary matrix multiply (block by block), because there the arithmetic, not the memory traffic,
sets the time.

## int4: 4-bit values, one scale and one offset per group of `group_size` inputs of a row
Row r's inputs come in groups of g (32, 64 or 128); group G of row r spans [lo, hi] = [min, max] of its
weights, cut into 15 steps:

    scale = (hi - lo) / 15      q[r, j] = round((W[r, j] - lo) / scale)  in 0..15
    W[r, j] ~ (q[r, j] - 8) * scale + zero,   zero = lo + 8 * scale

off by at most half a step. That is the form PyTorch's int4 kernels take (scales and zeros side by side,
(in/g, out, 2)), so decoding multiplies from the 4-bit bytes directly (kernels.int4_matmul); the bytes sit
in the order the device's kernel reads (int4_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compiled
from .int4_layouts import cpu_block_rows, cpu_unpack, pack_for_cpu, pack_for_cuda, plain_from_values, values_from_plain

QUANTIZE_ROWS = 4096  # rows converted at a time
INT4_GROUP_SIZES = (32, 64, 128)  # inputs sharing one scale and zero; PyTorch's int4 kernels take these (and 256)
INT4_GROUP_SIZE = 32  # the default: the most accurate, as llama.cpp's Q4_0 (docs/quantization.md: speed, accuracy)
INT4_STEPS = 15  # values 0..15
INT4_MIDDLE = 8  # the kernels compute (q - 8) * scale + zero
INT8_MAX = 127  # symmetric: -127..127, so that negating a weight never overflows
QUANTIZED_SUFFIXES = (  # the matrices that are multiplied; embeddings are looked up row by row and stay as they are
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
)


def is_quantized_key(key: str) -> bool:
    return key == "output.weight" or key.endswith(QUANTIZED_SUFFIXES)


class StoredMatrix:
    """What an int8 and an int4 matrix share: they answer for the weight matrix (out, in) they stand for, as a
    tensor would (`shape`, `dtype` -- the compute dtype, their scales' --, `device`, `nbytes`, `numel`), from
    their two tensors: the quantized values (`stored`) and what turns them back into weights (`scales_of`)."""

    shape: torch.Size
    stored: torch.Tensor
    scales_of: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_of.dtype

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes + self.scales_of.nbytes

    def numel(self) -> int:
        return self.shape.numel()  # the parameters it stands for


@dataclass(frozen=True)
class Int8Weight(StoredMatrix):
    """A weight matrix (out, in) as int8 values (out, in) and per-row scales (out,) in the compute dtype."""

    values: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # (out,), the compute dtype

    shape = property(lambda self: self.values.shape)
    stored = property(lambda self: self.values)
    scales_of = property(lambda self: self.scales)

    def to(self, device=None, dtype=None) -> "Int8Weight":
        """On `device`, with scales (and so the compute) in `dtype`; the int8 values stay int8."""
        # contiguous: a rank's column cut is a strided view, and the kernels read whole rows
        return Int8Weight(self.values.to(device=device).contiguous(), self.scales.to(device=device, dtype=dtype).contiguous())


def row_scales(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max |row| / 127 per row (out,), in `dtype`, rounded up so that no value needs more than 127 steps."""
    amax = w.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row gets a tiny scale
    scales = (amax / INT8_MAX).to(dtype)
    too_small = scales.float() * INT8_MAX < amax  # rounding to `dtype` went down: the row's largest value would not fit
    return torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Int8Weight:
    """Per-output-row symmetric int8 of a weight matrix (out, in); scales in the compute dtype `dtype`."""
    values = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=dtype, device=w.device)
    for start in range(0, w.shape[0], QUANTIZE_ROWS):  # in slices, so the float32 temporaries stay small
        rows = slice(start, start + QUANTIZE_ROWS)
        x = w[rows].to(torch.float32, copy=True)  # one float32 copy (never `w` itself), worked in place: half the time
        scales[rows] = row_scales(x, dtype)
        values[rows] = x.div_(scales[rows].float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return Int8Weight(values, scales)


def dequantize(w: Int8Weight | Int4Weight) -> torch.Tensor:
    """The matrix the quantized weight stands for (out, in), in its compute dtype."""
    if isinstance(w, Int4Weight):
        return dequantize_int4(w.values(), w.scales_and_zeros.cpu()).to(w.device)
    return (w.values.float() * w.scales.float()[:, None]).to(w.dtype)


@dataclass(frozen=True)
class Int4Weight(StoredMatrix):
    """A weight matrix (out, in) as 4-bit values, two to a byte, and a scale and zero per group of inputs.

    `packed` holds the values in `layout`: "plain" as checkpoints store them (and as tensor parallelism
    slices them, and the compiled CPU kernels read them), or the arrangement that PyTorch's int4 kernel
    of "cpu" or "cuda" reads (int4_layouts.py)."""

    packed: torch.Tensor  # uint8: (out, in/2) on the CPU and in plain; the CUDA kernel's own shape on CUDA
    scales_and_zeros: torch.Tensor  # (in/group_size, out, 2), the compute dtype
    in_features: int
    layout: str = "plain"

    shape = property(lambda self: torch.Size((self.scales_and_zeros.shape[1], self.in_features)))
    stored = property(lambda self: self.packed)
    scales_of = property(lambda self: self.scales_and_zeros)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales_and_zeros.shape[0]

    def values(self) -> torch.Tensor:
        """The 4-bit values, one to a byte: uint8 (out, in), 0..15, on the CPU."""
        if self.layout == "plain":
            return values_from_plain(self.packed)
        if self.layout == "cpu" and cpu_block_rows() is not None:
            return cpu_unpack(self.packed, self.shape[0], self.in_features, *cpu_block_rows())
        raise ValueError(f"int4 values in the {self.layout} kernel's arrangement cannot be read back here")

    def plain(self) -> torch.Tensor:
        """The values in the stored layout, uint8 (out, in/2), on the CPU."""
        return self.packed if self.layout == "plain" else plain_from_values(self.values())

    def to(self, device=None, dtype=None) -> "Int4Weight":
        """Packed for the kernel of `device` (the values are unchanged), scales and zeros in `dtype`."""
        device = torch.device(device) if device is not None else self.device
        layout = layout_for(device, self.shape, self.group_size, dtype or self.dtype)
        packed = self.packed if layout == self.layout else self.plain()
        if layout == "plain":
            packed = packed.contiguous()  # a rank's column cut is a strided view; the compiled kernels read rows whole
        elif layout != self.layout:
            packed = pack_for_cpu(packed) if layout == "cpu" else pack_for_cuda(packed.to(device))
        scales_and_zeros = self.scales_and_zeros.to(device=device, dtype=dtype)  # the kernels read it in order:
        scales_and_zeros = groups_by_row(scales_and_zeros) if layout == "plain" else scales_and_zeros.contiguous()
        return Int4Weight(packed, scales_and_zeros, self.in_features, layout)


QuantizedWeight = Int8Weight | Int4Weight


def groups_by_row(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The same (in/g, out, 2) tensor with a row's groups side by side in memory, as (out, in/g, 2) would be:
    the compiled int4 kernels read a row's scales and zeros with its values. Saved so, it maps back so."""
    by_row = scales_and_zeros.transpose(0, 1)
    return scales_and_zeros if by_row.is_contiguous() else by_row.contiguous().transpose(0, 1)


def layout_for(device: torch.device, shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> str:
    """The layout an int4 matrix is multiplied from on `device`: the compiled CPU kernels read the plain one."""
    if device.type == "cpu" and compiled.takes_int4(shape, group_size, dtype):
        return "plain"
    return device.type


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype = torch.bfloat16) -> Int4Weight:
    """Groupwise asymmetric int4 of a weight matrix (out, in), in the plain layout; see the module's text."""
    out_features, in_features = w.shape
    plain = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
    scales_and_zeros = torch.empty(in_features // group_size, out_features, 2, dtype=dtype)
    for start in range(0, out_features, QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        groups = w[rows].to(torch.float32, copy=True).reshape(-1, in_features // group_size, group_size)  # (rows, groups, g)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((hi - lo) / INT4_STEPS).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
        zero = (lo + INT4_MIDDLE * scale.float()).to(dtype)  # both rounded to `dtype`, as the kernel reads them
        # Steps from the rounded zero, so that the rounding of scale and zero is part of what q corrects.
        q = groups.sub_(zero.float()[..., None]).div_(scale.float()[..., None]).round_().add_(INT4_MIDDLE)  # in place
        plain[rows] = plain_from_values(q.clamp_(0, INT4_STEPS).reshape(-1, in_features).cpu())
        scales_and_zeros[:, rows] = torch.stack([scale, zero], dim=-1).transpose(0, 1).cpu()
    return Int4Weight(plain, scales_and_zeros, in_features)


def dequantize_int4(values: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """Rows of an int4 matrix: values 0..15 (rows, in) and their scales and zeros (in/g, rows, 2) -> (rows, in)."""
    scale, zero = scales_and_zeros.float().permute(1, 0, 2).contiguous().unbind(dim=-1)  # each (rows, groups)
    # In float32, as the kernels compute each weight, then rounded once to the compute dtype; in place, and
    # as q * scale + (zero - 8 * scale), so that the float32 copy is made and walked once.
    weights = values.view(values.shape[0], scale.shape[1], -1).float()  # (rows, groups, g)
    weights.mul_(scale.unsqueeze(-1)).add_((zero - INT4_MIDDLE * scale).unsqueeze(-1))
    return weights.view(values.shape).to(scales_and_zeros.dtype)


def check_int4_shape(shape: tuple[int, int], group_size: int) -> str | None:
    """Why PyTorch's int4 kernels cannot take a matrix of `shape` in groups of `group_size`, or None."""
    out_features, in_features = shape
    if in_features % group_size:
        return f"its {in_features} inputs do not split into groups of {group_size}"
    if out_features % 16:
        return f"its {out_features} rows are not a multiple of 16"
    return None


def quantize_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16, scheme: str = "int8",
                     group_size: int = INT4_GROUP_SIZE) -> dict:
    """The weight dict with every attention/feed-forward matrix and the output matrix as Int8Weight
    (`scheme` "int8") or Int4Weight ("int4", groups of `group_size`), on the device the tensors are on.

    A tied output matrix gets its own quantized copy while the embeddings stay as they are: the lookup
    reads one row per token, the output multiply reads the whole matrix every token.
    """
    out = {}
    for key, tensor in weights.items():
        if isinstance(tensor, QuantizedWeight):  # read from a quantized checkpoint: already done
            out[key] = tensor.to(dtype=dtype)
        elif is_quantized_key(key) and scheme == "int4":
            out[key] = quantize_int4(tensor, group_size, dtype).to(tensor.device)
        elif is_quantized_key(key):
            out[key] = quantize_int8(tensor, dtype)
        else:
            out[key] = tensor.to(dtype)
    return out
