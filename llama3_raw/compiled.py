"""The optional compiled decode kernels (csrc/decode_kernels.c), and when they apply.

Decoding one token reads every weight once, so its speed is the speed at which the weights stream from
memory. PyTorch's own one-row CPU products run out of arithmetic before memory runs out (each weight is
converted to float32 first); these read bf16, int8 and int4 weights as stored, with AVX-512's dot-product
instructions, and keep up with memory (docs/performance.md, "Side by side with llama.cpp"):

- bf16: exact products, float32 sums (only the order of the additions differs from PyTorch's);
- int8: activations rounded to int16 per block of 32 inputs (error at most block max / 65534 each);
- int4: activations rounded to int8 per block of 32 (at most block max / 254 each), as llama.cpp does;
- int4 back to bf16 for prompts, bit for bit as quantize.dequantize_int4.

Between its products a decode step does little arithmetic, but in PyTorch that little is some forty operator
calls a layer, each paying its dispatch: 4 ms of a 1B token, against 24 ms of int4 products. So RMSNorm, RoPE
and attention over the cache have compiled twins here too (fast_forward.py links them in front of model.py's
functions of the same names), each one call that rounds where the model rounds (tests/test_decode_steps.py
holds them to model.py's own code).

pip builds them with the package (setup.py; `pip install -e .` in a clone); without a C compiler the build
is skipped. They are used where built, on CPUs with AVX-512 BF16, VNNI, VBMI and GFNI, unless the environment
variable LLAMA3_RAW_COMPILED is 0. Otherwise PyTorch's products serve: they are also the reference the
tests hold these kernels to (tests/test_decode_kernels.py).
"""

import math
import os

import torch

try:
    from . import _decode_kernels as built
except ImportError:  # not built: PyTorch's products serve
    built = None

Tensor = torch.Tensor
SWITCH_ENV = "LLAMA3_RAW_COMPILED"
BLOCK = 32  # inputs that share one activation scale in the int8 and int4 products
INT4_CHUNK = 64  # the int4 kernels read rows in whole 32-byte pieces (64 inputs) ...
INT4_WINDOW = 128  # ... two at a time, and a window's 4 blocks must each lie in one group


def usable() -> bool:
    """Built, not switched off, and this CPU has the instructions the kernels use (AVX-512 with BF16, VNNI,
    VBMI and GFNI)."""
    return built is not None and os.environ.get(SWITCH_ENV) != "0" and built.supported()


def _cpu_bf16(*tensors: Tensor) -> bool:
    # (the checks of every decoding step: plain attribute reads, kept cheap)
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.requires_grad:
            return False
    return True


# The products take one row of activations x (..., in) -- x.numel() == in -- and several matrices at once
# (at most MAX_MATRICES), all multiplied by it in one call: x @ W.T for each, (..., out). They give None where
# the kernels do not apply to all of them. (Several at once: the threads share all their rows as one list.)
MAX_MATRICES = 8


def bf16_products(x: Tensor, matrices: list[Tensor]) -> list[Tensor] | None:
    """For bf16 matrices w (out, in)."""
    return _products("bf16", x, matrices, _bf16_entry)


def int8_products(x: Tensor, matrices: list[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
    """For int8 matrices given as (values (out, in) int8, scales (out,) bf16): x @ (values * scales[:, None]).T."""
    return _products("int8", x, matrices, _int8_entry)


def int4_products(x: Tensor, matrices: list[tuple[Tensor, Tensor]]) -> list[Tensor] | None:
    """For int4 matrices in the plain layout, given as (packed (out, in/2) uint8, scales_and_zeros (in/g, out, 2)
    bf16, laid out by row)."""
    return _products("int4", x, matrices, _int4_entry)


def _products(kernel: str, x: Tensor, matrices: list, entry) -> list[Tensor] | None:
    # kernel: the built module's function; entry(matrix, in) -> (weights, scales or None, group size or 0) as it
    # reads them, or None
    in_features = x.shape[-1]
    if not (usable() and 0 < len(matrices) <= MAX_MATRICES and x.numel() == in_features and _cpu_bf16(x)):
        return None
    entries = []
    for matrix in matrices:
        entries.append(entry(matrix, in_features))
        if entries[-1] is None:
            return None
    x = x.contiguous()
    outputs = [torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.bfloat16) for w, _, _ in entries]
    addresses = [(w.data_ptr(), 0 if scales is None else scales.data_ptr(), y.data_ptr(), w.shape[0], group)
                 for (w, scales, group), y in zip(entries, outputs)]
    getattr(built, kernel)(x.data_ptr(), addresses, in_features, torch.get_num_threads())
    return outputs


def _bf16_entry(w: Tensor, in_features: int) -> tuple | None:
    if w.dim() == 2 and w.shape[1] == in_features and w.is_contiguous() and _cpu_bf16(w):
        return w, None, 0
    return None


def _int8_entry(matrix: tuple[Tensor, Tensor], in_features: int) -> tuple | None:
    values, scales = matrix
    if (in_features % BLOCK == 0 and values.dtype == torch.int8 and values.device.type == "cpu" and values.dim() == 2
            and values.shape[1] == in_features and values.is_contiguous()
            and scales.shape == values.shape[:1] and scales.is_contiguous() and _cpu_bf16(scales)):
        return values, scales, 0
    return None


def _int4_entry(matrix: tuple[Tensor, Tensor], in_features: int) -> tuple | None:
    packed, scales_and_zeros = matrix
    if _takes_int4_tensors(packed, scales_and_zeros, in_features):
        return packed, scales_and_zeros, in_features // scales_and_zeros.shape[0]
    return None


def takes_int4(shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> bool:
    """Whether the int4 kernels take a matrix of this shape, group size and compute dtype (in the plain layout)."""
    return usable() and _int4_shape_fits(shape, group_size, dtype)


def _int4_shape_fits(shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> bool:
    out_features, in_features = shape
    return (dtype == torch.bfloat16 and group_size > 0 and group_size % BLOCK == 0
            and INT4_WINDOW % group_size == 0 and in_features % INT4_CHUNK == 0 and out_features > 0)


def _takes_int4_tensors(packed: Tensor, scales_and_zeros: Tensor, in_features: int) -> bool:
    # scales_and_zeros (in/g, out, 2) with a row's groups side by side in memory (quantize.groups_by_row)
    if scales_and_zeros.dim() != 3 or scales_and_zeros.shape[0] == 0 or in_features % scales_and_zeros.shape[0]:
        return False
    groups, out_features, pair = scales_and_zeros.shape
    stride = scales_and_zeros.stride()
    by_row = pair == 2 and stride[1:] == (2 * groups, 1) and (groups == 1 or stride[0] == 2)
    return (by_row and packed.dtype == torch.uint8 and packed.device.type == "cpu" and packed.is_contiguous()
            and packed.shape == (out_features, in_features // 2) and _cpu_bf16(scales_and_zeros)
            and _int4_shape_fits((out_features, in_features), in_features // groups, scales_and_zeros.dtype))


def int4_dequantize(packed: Tensor, scales_and_zeros: Tensor, in_features: int, start: int, out: Tensor) -> Tensor | None:
    """Rows start .. start + len(out) of an int4 matrix (plain layout) as bf16, written into out (rows, in) and
    returned; None where the kernel does not apply."""
    fits = 0 <= start and start + out.shape[0] <= packed.shape[0] and out.shape[1:] == (in_features,)
    if not (fits and usable() and _cpu_bf16(out) and out.is_contiguous()
            and _takes_int4_tensors(packed, scales_and_zeros, in_features)):
        return None
    group_size = in_features // scales_and_zeros.shape[0]
    built.int4_dequantize(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), start, out.shape[0],
                          in_features, group_size, torch.get_num_threads())
    return out


# ---- the rest of a decode step (model.py's functions of the same names; fast_forward.py links these first) ----

DECODE_ROWS = 32  # rows of activations (batch rows of one new position each) up to which these apply
MAX_HEAD_DIM = 256  # the attention kernel keeps a query head in 16 registers


def _decoding_bf16(*tensors: Tensor) -> bool:
    return usable() and _cpu_bf16(*tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """model.rms_norm of up to DECODE_ROWS rows, or None."""
    n = x.shape[-1]
    if not (_decoding_bf16(x, weight) and x.numel() <= DECODE_ROWS * n and n % 16 == 0 and weight.shape == (n,)
            and x.is_contiguous() and weight.is_contiguous()):
        return None
    out = torch.empty_like(x)
    built.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor | None:
    """model.apply_rope for one new position per batch row (x (B, 1, heads, Dh)), or None."""
    if x.dim() != 4:
        return None
    batch, seq_len, heads, head_dim = x.shape
    shared = rotations.shape == (1, head_dim // 2)  # the same position for every row; else one per row
    if not (_decoding_bf16(x) and seq_len == 1 and batch <= DECODE_ROWS and head_dim % 2 == 0
            and rotations.dtype == torch.complex64 and (shared or rotations.shape == (batch, 1, head_dim // 2))
            and x.is_contiguous() and rotations.is_contiguous()):
        return None
    out = torch.empty_like(x)
    built.rope(x.data_ptr(), rotations.data_ptr(), out.data_ptr(), batch, heads, head_dim, 0 if shared else head_dim)
    return out


def attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, record: dict | None = None,
           name: str = "") -> Tensor | None:
    """model.attend for one new position per batch row, or None (also when the caller records intermediates).
    keys and values: (B, T, K, Dh) views of the cache, kv heads side by side in each position's row."""
    batch, seq_len, n_heads, head_dim = q.shape
    _, positions, n_kv_heads, _ = keys.shape
    strides = keys.stride()
    if not (record is None and _decoding_bf16(q, keys, values) and seq_len == 1 and batch <= DECODE_ROWS
            and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and n_heads % n_kv_heads == 0
            and keys.shape == values.shape == (batch, positions, n_kv_heads, head_dim) and positions > 0
            and values.stride() == strides and strides[2:] == (head_dim, 1) and q.is_contiguous()
            and (mask is None or _decoding_bf16(mask) and mask.shape == (batch, 1, 1, positions) and mask.stride(-1) == 1)):
        return None
    out = torch.empty(batch, 1, n_heads * head_dim, dtype=torch.bfloat16)
    built.attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), 0 if mask is None else mask.data_ptr(),
                 out.data_ptr(), batch, n_heads, n_kv_heads, positions, head_dim, strides[0], strides[1],
                 0 if mask is None else mask.stride(0), math.sqrt(head_dim), torch.get_num_threads())
    return out
