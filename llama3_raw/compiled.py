"""The optional compiled decode kernels (csrc/decode_kernels.c), and when they apply.

Decoding one token reads every weight once, so its speed is the speed at which the weights stream from
memory. PyTorch's own one-row CPU products run out of arithmetic before memory runs out (each weight is
converted to float32 first); these read bf16, int8 and int4 weights as stored, with AVX-512's dot-product
instructions, and keep up with memory (README, "Side by side with llama.cpp"):

- bf16: exact products, float32 sums (only the order of the additions differs from PyTorch's);
- int8: activations rounded to int16 per block of 32 inputs (error at most block max / 65534 each);
- int4: activations rounded to int8 per block of 32 (at most block max / 254 each), as llama.cpp does;
- int4 back to bf16 for prompts, bit for bit as quantize.dequantize_int4.

pip builds them with the package (setup.py; `pip install -e .` in a clone); without a C compiler the build
is skipped. They are used where built, on CPUs with AVX-512 BF16, VNNI, VBMI and GFNI, unless the environment
variable LLAMA3_RAW_COMPILED is 0. Otherwise PyTorch's products serve: they are also the reference the
tests hold these kernels to (tests/test_decode_kernels.py).
"""

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


def _cpu_bf16(x: Tensor, other: Tensor) -> bool:
    # (the checks of every decoding step: plain attribute reads, kept cheap)
    bf16 = torch.bfloat16
    return x.dtype == bf16 and other.dtype == bf16 and x.device.type == "cpu" and other.device.type == "cpu"


def bf16_product(x: Tensor, w: Tensor) -> Tensor | None:
    """x (in,) @ w.T for a bf16 matrix w (out, in) -> (out,), or None where the kernel does not apply.
    (x: one row of activations, of any shape with `in` elements, as are the x of the products below.)"""
    if not (usable() and _cpu_bf16(x, w) and w.is_contiguous() and x.numel() == w.shape[1]):
        return None
    x, y = x.contiguous(), torch.empty(w.shape[0], dtype=torch.bfloat16)
    built.bf16(x.data_ptr(), w.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], torch.get_num_threads())
    return y


def int8_product(x: Tensor, values: Tensor, scales: Tensor) -> Tensor | None:
    """x (in,) @ (values * scales[:, None]).T for int8 values (out, in) -> (out,), or None."""
    out_features, in_features = values.shape
    if not (usable() and _cpu_bf16(x, scales) and values.is_contiguous() and scales.is_contiguous()
            and scales.shape == (out_features,) and in_features % BLOCK == 0 and x.numel() == in_features):
        return None
    x, y = x.contiguous(), torch.empty(out_features, dtype=torch.bfloat16)
    built.int8(x.data_ptr(), values.data_ptr(), scales.data_ptr(), y.data_ptr(), out_features, in_features,
               torch.get_num_threads())
    return y


def takes_int4(shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> bool:
    """Whether the int4 kernels take a matrix of this shape, group size and compute dtype (in the plain layout)."""
    out_features, in_features = shape
    return (usable() and dtype == torch.bfloat16 and group_size > 0 and group_size % BLOCK == 0
            and INT4_WINDOW % group_size == 0 and in_features % INT4_CHUNK == 0 and out_features > 0)


def _takes_int4_tensors(packed: Tensor, scales_and_zeros: Tensor, in_features: int) -> bool:
    # scales_and_zeros (in/g, out, 2) with a row's groups side by side in memory (quantize.groups_by_row)
    if scales_and_zeros.dim() != 3 or scales_and_zeros.shape[0] == 0 or in_features % scales_and_zeros.shape[0]:
        return False
    groups, out_features, pair = scales_and_zeros.shape
    stride = scales_and_zeros.stride()
    by_row = pair == 2 and stride[1:] == (2 * groups, 1) and (groups == 1 or stride[0] == 2)
    return (by_row and packed.dtype == torch.uint8 and packed.is_contiguous()
            and packed.shape == (out_features, in_features // 2)
            and takes_int4((out_features, in_features), in_features // groups, scales_and_zeros.dtype))


def int4_product(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, in_features: int) -> Tensor | None:
    """x (in,) @ W.T for W in int4, plain layout (packed (out, in/2), scales_and_zeros (in/g, out, 2) laid out by
    row) -> (out,), or None where the kernel does not apply."""
    if not (_cpu_bf16(x, scales_and_zeros) and x.numel() == in_features
            and _takes_int4_tensors(packed, scales_and_zeros, in_features)):
        return None
    out_features, group_size = packed.shape[0], in_features // scales_and_zeros.shape[0]
    x, y = x.contiguous(), torch.empty(out_features, dtype=torch.bfloat16)
    built.int4(x.data_ptr(), packed.data_ptr(), scales_and_zeros.data_ptr(), y.data_ptr(), out_features,
               in_features, group_size, torch.get_num_threads())
    return y


def int4_dequantize(packed: Tensor, scales_and_zeros: Tensor, in_features: int, start: int, out: Tensor) -> Tensor | None:
    """Rows start .. start + len(out) of an int4 matrix (plain layout) as bf16, written into out (rows, in) and
    returned; None where the kernel does not apply."""
    fits = 0 <= start and start + out.shape[0] <= packed.shape[0] and out.shape[1:] == (in_features,)
    if not (fits and _cpu_bf16(out, scales_and_zeros) and out.is_contiguous()
            and _takes_int4_tensors(packed, scales_and_zeros, in_features)):
        return None
    group_size = in_features // scales_and_zeros.shape[0]
    built.int4_dequantize(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), start, out.shape[0],
                          in_features, group_size, torch.get_num_threads())
    return out
