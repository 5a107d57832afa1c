"""Faster code for model.py's products (`matmul`, `matmuls`, `batched_matmul`), which the decode step links in
(fast_forward.py), and the products of int8/int4 weights, which model.py's own products call.

Nothing here changes the math (every product computes x @ W.T); it only picks the code that does it
fastest for the case at hand, so model.py can read as Llama 3:

- many rows (a prompt, a training batch): PyTorch's ordinary matrix multiply;
- one row on the CPU (decoding one token): `row_times_matrix`, tuned to stream the weights quickly,
  because decoding reads every weight once per token and that read sets decode speed;
- an int8 weight (quantize.py): `int8_matmul`, which reads the int8 bytes instead of a bf16 matrix;
- an int4 weight (quantize.py): `int4_matmul`, which reads the 4-bit bytes.

One-row products on the CPU go first to the compiled kernels (compiled.py) where they are built and apply,
several weights of the same input in one call (`matmuls`); PyTorch's products are the fallback. The rest of a
decode step -- RMSNorm, RoPE, attention over the cache -- has compiled twins too (compiled.py; fast_forward.py
links them in front of model.py's functions).
"""
import contextlib
import math

import torch

from . import compiled
from .int4_layouts import cpu_block_rows, cpu_unpack, values_from_plain
from .quantize import Int4Weight, Int8Weight, dequantize_int4

Tensor = torch.Tensor
Weight = Tensor | Int8Weight | Int4Weight  # a matrix (out, in) as stored, or its int8 / int4 form (quantize.py)

INT8_KERNEL_COLUMNS = 16  # _weight_int8pack_mm multiplies correctly only inputs that come in whole tiles of these
DEQUANTIZE_ELEMENTS = 1 << 22  # weights converted to bf16 at a time in a many-row int8 product: 8 MB


def quantized_matmul(x: Tensor, w: Int8Weight | Int4Weight) -> Tensor:
    """x @ dequantize(w).T: (..., in) -> (..., out), from the weight's int8 or int4 bytes."""
    return int8_matmul(x, w) if isinstance(w, Int8Weight) else int4_matmul(x, w)


def matmul(x: Tensor, w: Weight) -> Tensor:
    """x @ w.T for a weight matrix w (out, in): (..., in) -> (..., out), by the fastest kernel for the case."""
    if x.numel() == x.shape[-1]:  # one row (decoding one token): the compiled kernels where they apply
        products = compiled_products(x, (w,))
        if products is not None:
            return products[0]
    if not isinstance(w, Tensor):
        return quantized_matmul(x, w)
    if x.numel() == x.shape[-1] and x.device.type == "cpu":
        return row_times_matrix(x, w)  # decoding one token: a matrix-vector product
    return x @ w.T


def matmuls(x: Tensor, *ws: Weight) -> tuple[Tensor, ...]:
    """(x @ w.T for w in ws): one input times several weights (attention's q, k, v; the feed-forward's w1, w3).
    Decoding through the compiled kernels, all in one call, the threads sharing all the matrices' rows."""
    products = compiled_products(x, ws) if x.numel() == x.shape[-1] else None
    return tuple(products) if products is not None else tuple(matmul(x, w) for w in ws)


def compiled_products(x: Tensor, ws: tuple[Weight, ...]) -> list[Tensor] | None:
    """One row x times weights of one kind (bf16, int8, int4 in the plain layout) by the compiled kernels, or None."""
    if all(isinstance(w, Tensor) for w in ws):
        return compiled.bf16_products(x, list(ws))
    if all(isinstance(w, Int8Weight) for w in ws):
        return compiled.int8_products(x, [(w.values, w.scales) for w in ws])
    if all(isinstance(w, Int4Weight) and w.layout == "plain" for w in ws):
        return compiled.int4_products(x, [(w.packed, w.scales_and_zeros) for w in ws])
    return None


def row_times_matrix(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T for a single row of activations on the CPU, with the kernels that stream weights fastest.

    Decoding reads every weight once per token, so this product's read speed sets decode speed.
    bf16: PyTorch hands it to oneDNN, which streams 11-18 GB/s per core here; PyTorch's own matrix-vector
    kernel (used while oneDNN is switched off) ~28 GB/s. Only these products switch it off: oneDNN stays
    the faster choice for everything with many rows (prompts, and attention over the cache).
    float32: MKL's matrix-vector product runs on one core however many threads torch has. Seen as a
    batch of row blocks (blocks, out/blocks, in) -- a view, no copy -- it is shared out among the
    threads. Each output is still the dot product of one weight row with x.
    """
    threads = torch.get_num_threads()
    blocks = 1
    if x.dtype == torch.float32 and threads > 1 and w.is_contiguous():
        blocks = math.gcd(w.shape[0], 4 * threads)
    with without_onednn():
        if blocks == 1:
            return x @ w.T
        out = x.reshape(1, -1) @ w.view(blocks, -1, w.shape[1]).mT  # (blocks, 1, out/blocks)
    return out.view(*x.shape[:-1], -1)  # the blocks are consecutive rows: (..., out)


# Attention products with up to this many query rows (decoding: the query heads that share a key head) go
# through float32 on the CPU; see batched_matmul.
FLOAT32_ATTENTION_ROWS = 32


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for attention's products (..., M, K) @ (..., K, N): scores against the cached keys, and the
    probabilities against the cached values. Same sums, by the fastest kernel for the case.

    Decoding in bf16 on the CPU, oneDNN's batched product builds a new primitive whenever the cache has grown,
    which is every step: 75-120 us a call here against ~25 us to convert both to float32, multiply (MKL), and
    round the result to bf16 -- what a bf16 product returns too (float32 sums, rounded once), added in another
    order. Prompts and training keep the ordinary product (many rows: oneDNN's is faster there).
    """
    if a.dtype == torch.bfloat16 and a.device.type == "cpu" and a.shape[-2] <= FLOAT32_ATTENTION_ROWS:
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


@contextlib.contextmanager
def without_onednn():
    """PyTorch's own CPU kernels instead of oneDNN's for the calls inside (same math, other code)."""
    was_enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was_enabled


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x @ dequantize(w).T: (..., in) -> (..., out), with x in the weight's compute dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    if rows.shape[0] == 1 and x.device.type == "cpu" and w.shape[1] % INT8_KERNEL_COLUMNS == 0:
        # values.T converted one tile at a time inside the kernel, then each output column times its scale.
        # (Only for whole tiles of inputs: with any other count PyTorch 2.13's kernel reads past the row, giving
        # wrong sums or a crash -- measured with 36, 100 and 2050 inputs; 48, 96, 128 are right.)
        out = torch._weight_int8pack_mm(rows, w.values, w.scales)  # (1, out)
    else:  # many rows: the values in the compute dtype a block at a time, then each output column times its scale
        step = max(1, DEQUANTIZE_ELEMENTS // w.shape[1])
        out = product_by_row_blocks(rows, w.shape[0], step, lambda start, stop: w.values[start:stop].to(x.dtype))
        out *= w.scales
    return out.view(*x.shape[:-1], -1)


def product_by_row_blocks(rows: Tensor, out_features: int, step: int, weight_rows) -> Tensor:
    """rows (N, in) @ W.T for a matrix W kept in another form (int8, int4): `weight_rows(start, stop)` gives
    its rows start..stop in the compute dtype, `step` rows at a time. Each conversion is paid once for all N
    rows; a block of DEQUANTIZE_ELEMENTS is reused by the allocator, where a whole converted matrix (up to
    500 MB) would be fresh memory, page-faulted in on every call."""
    out = torch.empty(rows.shape[0], out_features, dtype=rows.dtype, device=rows.device)  # (N, out)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[:, start:stop] = rows @ weight_rows(start, stop).T
    return out


# Up to here the int4 kernel beats dequantizing then multiplying (measured on an 8192x2048 matrix, 2 threads:
# 17 rows 4 ms against 98, 128 rows 26 against 110, 512 rows 102 against 76).
INT4_KERNEL_MAX_ROWS = 256
# Up to here the compiled one-row int4 product, row after row, beats the compiled dequantization then multiplying
# (8192x2048, 2 threads: ~0.35 ms a row, against 8 ms to dequantize the matrix plus the multiply itself).
COMPILED_INT4_MAX_ROWS = 32


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x @ dequantize(w).T: (..., in) -> (..., out), with x in the weight's compute dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    if w.layout != x.device.type and not (w.layout == "plain" and x.device.type == "cpu"):
        w = w.to(x.device)  # e.g. straight from a saved file, not through cast_weights: packed for its kernel now
    if w.layout == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(rows, w.packed, w.group_size, w.scales_and_zeros)
    elif w.layout == "plain":  # the compiled kernels read it (layout_for)
        out = plain_int4_matmul(rows, w)
    elif rows.shape[0] <= INT4_KERNEL_MAX_ROWS or cpu_block_rows() is None:
        # Each 4-bit value turned into a float in registers, times its group's scale plus its zero, times x.
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, w.packed, w.group_size, w.scales_and_zeros)  # (N, out)
    else:
        # Many rows (a long prompt): the kernel works 4 rows at a time and its arithmetic, not memory, sets
        # its speed. So, as for int8, convert a block of weight rows, multiply, next.
        block_rows, halves = cpu_block_rows()
        step = max(block_rows, DEQUANTIZE_ELEMENTS // w.in_features // block_rows * block_rows)  # whole blocks

        def weight_rows(start: int, stop: int) -> Tensor:  # (stop - start, in)
            values = cpu_unpack(w.packed[start:stop], stop - start, w.in_features, block_rows, halves)
            return dequantize_int4(values, w.scales_and_zeros[:, start:stop])

        out = product_by_row_blocks(rows, w.shape[0], step, weight_rows)
    return out.view(*x.shape[:-1], -1)


def plain_int4_matmul(rows: Tensor, w: Int4Weight) -> Tensor:
    """rows (N, in) @ dequantize(w).T for w in the plain layout, through the compiled kernels where they apply."""
    if rows.shape[0] <= COMPILED_INT4_MAX_ROWS:
        products = [compiled.int4_products(row, [(w.packed, w.scales_and_zeros)]) for row in rows]
        if all(p is not None for p in products):
            return torch.stack([p[0] for p in products])  # (N, out)
    # Many rows: a block of weight rows back to the compute dtype, multiply, next block.
    step = max(1, DEQUANTIZE_ELEMENTS // w.in_features)
    buffer = torch.empty(min(step, w.shape[0]), w.in_features, dtype=rows.dtype)  # the compiled kernel writes here

    def weight_rows(start: int, stop: int) -> Tensor:  # (stop - start, in)
        block = compiled.int4_dequantize(w.packed, w.scales_and_zeros, w.in_features, start, buffer[:stop - start])
        if block is None:
            block = dequantize_int4(values_from_plain(w.packed[start:stop]), w.scales_and_zeros[:, start:stop])
        return block

    return product_by_row_blocks(rows, w.shape[0], step, weight_rows)
