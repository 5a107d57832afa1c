"""Weight-only int8: each weight matrix stored as int8 values and one scale per output row.

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
"""

from dataclasses import dataclass

import torch

QUANTIZE_ROWS = 4096  # rows converted at a time
INT8_MAX = 127  # symmetric: -127..127, so that negating a weight never overflows
QUANTIZED_SUFFIXES = (  # the matrices that are multiplied; embeddings are looked up row by row and stay as they are
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
)


def is_quantized_key(key: str) -> bool:
    return key == "output.weight" or key.endswith(QUANTIZED_SUFFIXES)


@dataclass(frozen=True)
class Int8Weight:
    """A weight matrix (out, in) as int8 values (out, in) and per-row scales (out,) in the compute dtype."""

    values: torch.Tensor  # int8 (out, in)
    scales: torch.Tensor  # (out,), the compute dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def numel(self) -> int:
        return self.values.numel()  # the parameters it stands for

    def to(self, device=None, dtype=None) -> "Int8Weight":
        """On `device`, with scales (and so the compute) in `dtype`; the int8 values stay int8."""
        return Int8Weight(self.values.to(device=device), self.scales.to(device=device, dtype=dtype))


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
        scales[rows] = row_scales(w[rows], dtype)
        values[rows] = torch.round(w[rows].float() / scales[rows].float()[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return Int8Weight(values, scales)


def dequantize(w: Int8Weight) -> torch.Tensor:
    """The matrix the int8 weight stands for (out, in), in its compute dtype."""
    return (w.values.float() * w.scales.float()[:, None]).to(w.dtype)


def quantize_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict:
    """The weight dict with every attention/feed-forward matrix and the output matrix as Int8Weight.

    A tied output matrix gets its own int8 copy while the embeddings stay as they are: the lookup reads
    one row per token, the output multiply reads the whole matrix every token.
    """
    out = {}
    for key, tensor in weights.items():
        if isinstance(tensor, Int8Weight):  # read from an int8 checkpoint: already done
            out[key] = tensor.to(dtype=dtype)
        elif is_quantized_key(key):
            out[key] = quantize_int8(tensor, dtype)
        else:
            out[key] = tensor.to(dtype)
    return out
