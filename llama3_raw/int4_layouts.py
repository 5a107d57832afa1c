"""Where the 4-bit values of an int4 matrix sit in memory: the layout the checkpoint stores, and the layouts
PyTorch's int4 kernels read.

A matrix of 4-bit values q (out, in), each 0..15, is stored two values to a byte. The stored ("plain")
layout is the one PyTorch's CUDA packing takes as input (and gpt-fast saves): row by row, byte j of a row
holds column 2j in its high half and column 2j+1 in its low half:

    plain[r, j] = q[r, 2j] << 4 | q[r, 2j + 1]              uint8 (out, in/2)

The CPU kernel (`torch.ops.aten._weight_int4pack_mm_for_cpu`) reads another arrangement, made by
`_convert_weight_to_int4pack_for_cpu` and chosen by the CPU's vector width when PyTorch starts
(aten/src/ATen/native/cpu/int4mm_kernel.cpp): rows in blocks of BLOCK_N, and within a block, for each
column k, BLOCK_N/2 bytes, byte j holding row j (low half) and row j + BLOCK_N/2 (high half) on AVX-512
(BLOCK_N 64) and AVX2 (32); neighbouring rows share a byte otherwise and in a last, partial block.
Prompts need the values back to dequantize them (kernels.int4_matmul), so `cpu_unpack` inverts the
arrangement; which one this machine uses is found once by packing a probe (`cpu_block_rows`).
The CUDA kernel's arrangement (`_convert_weight_to_int4pack`) is only ever read by that kernel.
"""

import functools

import torch

Tensor = torch.Tensor
CUDA_INNER_K_TILES = 8  # how the CUDA packing tiles the input dimension (gpt-fast's choice; in must divide by 16 * 8)
BLOCK_CANDIDATES = ((64, True), (32, True), (32, False))  # (BLOCK_N, halves) of AVX-512, AVX2, no vectors


def plain_from_values(q: Tensor) -> Tensor:
    """Values 0..15 (out, in) -> the stored layout, uint8 (out, in/2)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4 | q[:, 1::2]).contiguous()


def values_from_plain(plain: Tensor) -> Tensor:
    """The stored layout uint8 (out, in/2) -> values 0..15 as uint8 (out, in)."""
    return torch.stack([plain >> 4, plain & 15], dim=-1).view(plain.shape[0], -1)


def pack_for_cpu(plain: Tensor) -> Tensor:
    """The stored layout -> the CPU kernel's (same size), a few thousand rows at a time so that the int32
    values PyTorch's packing takes stay small. Row blocks pack independently, so the pieces join up."""
    packed = torch.empty(plain.shape, dtype=torch.uint8)
    step = 4096  # a multiple of every BLOCK_N
    for start in range(0, plain.shape[0], step):
        rows = values_from_plain(plain[start:start + step]).to(torch.int32)
        packed[start:start + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1).view(-1, plain.shape[1])
    return packed


def pack_for_cuda(plain: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(plain.contiguous(), CUDA_INNER_K_TILES)


def cpu_unpack(packed: Tensor, n_rows: int, n_cols: int, block_rows: int, halves: bool) -> Tensor:
    """The CPU kernel's arrangement of `n_rows` consecutive rows (starting at a block boundary) -> values
    0..15 as uint8 (n_rows, n_cols)."""
    flat = packed.reshape(-1)
    full = n_rows // block_rows * block_rows
    pieces = []
    if full:
        data = flat[:full * n_cols // 2].view(-1, n_cols, block_rows // 2)  # (blocks, in, BLOCK_N/2)
        if halves:  # byte j: row j low, row j + BLOCK_N/2 high
            rows = torch.cat([data & 15, data >> 4], dim=-1)  # (blocks, in, BLOCK_N)
        else:  # byte j: rows 2j (low) and 2j + 1 (high)
            rows = torch.stack([data & 15, data >> 4], dim=-1).view(-1, n_cols, block_rows)
        pieces.append(rows.transpose(1, 2).reshape(full, n_cols))
    if n_rows > full:  # a last, partial block: neighbouring rows share a byte
        data = flat[full * n_cols // 2:n_rows * n_cols // 2].view(n_cols, -1)  # (in, rows/2)
        pieces.append(torch.stack([data & 15, data >> 4], dim=-1).view(n_cols, -1).T)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()


@functools.cache
def cpu_block_rows() -> tuple[int, bool] | None:
    """(BLOCK_N, halves) of the arrangement this machine's CPU kernel reads, or None if it is none of those
    `cpu_unpack` knows (then prompts multiply through the kernel itself, which is slower but exact)."""
    probe = (torch.arange(96 * 4, dtype=torch.int32).view(96, 4) * 7 + torch.arange(96, dtype=torch.int32)[:, None]) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block_rows, halves in BLOCK_CANDIDATES:
        if torch.equal(cpu_unpack(packed, 96, 4, block_rows, halves).to(torch.int32), probe):
            return block_rows, halves
    return None
