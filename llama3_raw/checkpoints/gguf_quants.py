"""GGUF's block-quantized tensors: read as they lie in the file, turned into weights one tensor at a time.

A quantized GGUF matrix (out, in) is stored row by row in blocks of inputs, each block a few scales and
its values. The types in the files people have (Q8_0 files, Q4_K_M files):

    Q8_0   32 inputs: d (f16), 32 int8 q                     w = q * d
    Q4_0   32 inputs: d (f16), 16 bytes of 4-bit q           w = (q - 8) * d
    Q4_1   32 inputs: d, m (f16), 16 bytes of 4-bit q        w = q * d + m
    Q4_K, Q5_K, Q6_K   256 inputs in sub-blocks with their own 6- or 8-bit scales (llama.cpp's "k-quants")

In the 4-bit blocks byte j holds input j in its low half and input j + 16 in its high half. Q8_0, Q4_0 and
Q4_1 and the k-quants are dequantized here, in PyTorch, in float32 as llama.cpp does, and then rounded once to the
compute dtype, a few thousand rows at a time.

Why our own code for those three when gguf.quants dequantizes them too: it is the same speed (2048 x 8192, bf16
out, 2026-12-07, alternating: Q8_0 0.032 s here / 0.039 s gguf.quants, Q4_0 0.043 / 0.032, Q4_1 0.036 / 0.041;
bit-identical results), the nibble and scale reads are the ones `as_int4` needs anyway, and it leaves gguf-py's
numpy code as an independent oracle in tests/test_gguf.py. For the k-quants ours is bit-identical to gguf.quants
and faster: the 1B shape's Q4_K_M file to bf16 in 3.8-5.5 s against 7.1-7.8 s (2026-12-07, two loads each).

Q4_0 and Q4_1 are exactly the project's int4 (quantize.py: W = (q - 8) * scale + zero in groups of 32):
Q4_0 is scale d, zero 0; Q4_1 is scale d, zero m + 8 d. `as_int4` keeps such a matrix 4-bit as it is,
its values untouched, instead of dequantizing it and quantizing again.
"""

from dataclasses import dataclass

import torch

from ..int4_layouts import plain_from_values
from ..quantize import INT4_MIDDLE, Int4Weight, is_quantized_key
from .gguf_file import TensorInfo, type_name
from .heap import file_backed_ranges, hand_back_file_pages

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 13, 14, 30  # GGMLQuantizationType
PLAIN_TYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
BLOCK_TYPES = (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)
SUPPORTED_TYPES = (*PLAIN_TYPES, *BLOCK_TYPES)
INT4_TYPES = (Q4_0, Q4_1)
GROUP = 32  # inputs per Q8_0 / Q4_0 / Q4_1 block
ROWS_AT_ONCE = 4096  # rows dequantized at a time, so that the float32 temporaries stay small


def file_tensor(mapping, info: TensorInfo):
    """The tensor `info` describes: F32 / F16 / BF16 as a view of the file's pages, a block type as BlockTensor."""
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.start)
    if info.ggml_type in PLAIN_TYPES:
        return raw.view(PLAIN_TYPES[info.ggml_type]).view(info.shape)
    return BlockTensor(raw.view(-1, info.nbytes // (torch.Size(info.shape).numel() // info.shape[-1])),
                       info.ggml_type, torch.Size(info.shape))


@dataclass(frozen=True)
class BlockTensor:
    """A block-quantized GGUF tensor, still in the file: answers for the weights it stands for as far as the
    loader asks (shape, numel, nbytes), and `to(device, dtype)` dequantizes it."""

    raw: torch.Tensor  # uint8 (rows, bytes per row), a view of the file
    ggml_type: int
    shape: torch.Size  # (rows, inputs)

    dtype = None  # no PyTorch dtype: dequantized to whatever the run computes in
    device = torch.device("cpu")

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return True  # it stands for floating-point weights

    def to(self, device=None, dtype=None) -> torch.Tensor:
        return dequantize(self, dtype or torch.float32).to(device or "cpu")


def dequantize(tensor: BlockTensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights (rows, inputs) in `dtype`, computed in float32 a slice of rows at a time."""
    out = torch.empty(tensor.shape, dtype=dtype)
    for start in range(0, tensor.shape[0], ROWS_AT_ONCE):
        rows = tensor.raw[start:start + ROWS_AT_ONCE]
        out[start:start + ROWS_AT_ONCE] = dequantize_rows(rows, tensor.ggml_type, tensor.shape[1])
    return out


def dequantize_rows(raw: torch.Tensor, ggml_type: int, n_inputs: int) -> torch.Tensor:
    """uint8 (rows, bytes per row) of one block type -> float32 (rows, n_inputs)."""
    if ggml_type in (Q8_0, Q4_0, Q4_1):
        values, scale, zero = int4_or_int8_blocks(raw, ggml_type)  # (rows, blocks, 32), (rows, blocks, 1) x2
        weights = values.float().mul_(scale)
        if zero is not None:
            weights.add_(zero)
        return weights.view(raw.shape[0], n_inputs)
    blocks = raw.reshape(-1, K_BLOCK_BYTES[ggml_type])  # (super-blocks, bytes): 256 inputs each
    values, scale, offset = K_QUANTS[ggml_type](blocks)  # (n, sub-blocks, inputs per sub-block), (n, sub, 1) x2
    weights = values.float().mul_(scale)
    if offset is not None:
        weights.sub_(offset)
    return weights.view(raw.shape[0], n_inputs)


# The k-quants, as ggml's dequantize_row_q4_K / q5_K / q6_K compute them: super-blocks of 256 inputs in 8 sub-blocks
# of 32 (Q4_K, Q5_K: w = d * sc * q - dmin * m, sc and m 6-bit per sub-block) or 16 of 16 (Q6_K: w = d * sc * q,
# sc int8). Products in float32 in the same order as ggml's, so the weights are ggml's, bit for bit.
K_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}


def k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes (n, 12) -> 8 six-bit scales and 8 six-bit mins (n, 8) each: bytes 0-3 hold scales 0-3 in their low
    six bits, 4-7 mins 0-3; bytes 8-11 the low four bits of scales 4-7 (low half) and mins 4-7 (high half), whose
    top two bits are the top two bits of bytes 0-3 (scales) and 4-7 (mins)."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return scales, mins


def k4_or_k5_blocks(blocks: torch.Tensor):
    """Q4_K / Q5_K super-blocks: d, dmin (f16), 12 bytes of scales and mins, [Q5_K: 32 bytes of fifth bits], 128
    bytes of low four bits. Each 32 bytes hold two sub-blocks: low halves the first, high halves the second."""
    n = blocks.shape[0]
    d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)  # (n, 1) each
    scales, mins = k_scales_and_mins(blocks[:, 4:16])
    low = blocks[:, -128:].reshape(n, 4, 1, 32)
    values = torch.cat([low & 15, low >> 4], dim=2).reshape(n, 8, 32)  # (n, sub-blocks, 32)
    if blocks.shape[1] == K_BLOCK_BYTES[Q5_K]:  # sub-block j's fifth bits: bit j of the 32 bytes
        high = blocks[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        values = values | ((high & 1) << 4)
    return values, (d * scales.float()).unsqueeze(-1), (dmin * mins.float()).unsqueeze(-1)


def k6_blocks(blocks: torch.Tensor):
    """Q6_K super-blocks: 128 bytes of low four bits, 64 of high two bits, 16 int8 scales, d (f16). Each half of
    128 inputs: its 64 low-bit bytes give inputs 0-63 (low halves) and 64-127 (high halves); its 32 high-bit
    bytes give each quarter of 32 inputs two bits, from the lowest pair up; values are q - 32."""
    n = blocks.shape[0]
    low = blocks[:, :128].reshape(n, 2, 1, 64)
    low = torch.cat([low & 15, low >> 4], dim=2).reshape(n, 2, 4, 32)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    values = (low | (high << 4)).to(torch.int8).sub_(32).reshape(n, 16, 16)  # (n, sub-blocks, 16)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    return values, (f16_field(blocks, 208) * scales).unsqueeze(-1), None


K_QUANTS = {Q4_K: k4_or_k5_blocks, Q5_K: k4_or_k5_blocks, Q6_K: k6_blocks}


def f16_field(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 at bytes at..at+1 of every block (rows, blocks, bytes) as float32 (rows, blocks, 1)."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16).float()


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 bytes per block (rows, blocks, 16) -> its 32 values 0..15 in input order (rows, blocks, 32)."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def int4_or_int8_blocks(raw: torch.Tensor, ggml_type: int):
    """(values, scale, zero or None) of Q8_0 / Q4_0 / Q4_1 rows, such that w = values * scale + zero:
    values (rows, blocks, 32) as int8 (Q8_0), or 0..15 shifted to -8..7 (Q4_0) or kept 0..15 (Q4_1)."""
    block_bytes = {Q8_0: 34, Q4_0: 18, Q4_1: 20}[ggml_type]
    blocks = raw.view(raw.shape[0], -1, block_bytes)
    d = f16_field(blocks, 0)
    if ggml_type == Q8_0:
        return blocks[..., 2:].contiguous().view(torch.int8), d, None
    if ggml_type == Q4_0:
        return nibbles(blocks[..., 2:]).to(torch.int8) - INT4_MIDDLE, d, None
    return nibbles(blocks[..., 4:]), d, f16_field(blocks, 2)


def as_int4(tensor: BlockTensor) -> Int4Weight:
    """A Q4_0 or Q4_1 matrix as the project's int4 (groups of 32, plain layout), its 4-bit values as the file
    has them: scale d; zero 0 (Q4_0) or m + 8 d (Q4_1), so that (q - 8) * scale + zero = the block's w."""
    rows, n_inputs = tensor.shape
    blocks = tensor.raw.view(rows, -1, {Q4_0: 18, Q4_1: 20}[tensor.ggml_type])
    d = f16_field(blocks, 0)[..., 0]  # (rows, groups)
    if tensor.ggml_type == Q4_0:
        values, zero = nibbles(blocks[..., 2:]), torch.zeros_like(d)
    else:
        values, zero = nibbles(blocks[..., 4:]), f16_field(blocks, 2)[..., 0] + INT4_MIDDLE * d
    scales_and_zeros = torch.stack([d, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, rows, 2)
    return Int4Weight(plain_from_values(values.reshape(rows, n_inputs)), scales_and_zeros, n_inputs)


def kept_int4(weights: dict) -> dict:
    """The weights with every Q4_0 / Q4_1 matrix that int4 quantizes (quantize.is_quantized_key) as_int4; the
    file's pages of each go once it is unpacked (heap.py says why)."""
    file_ranges = file_backed_ranges()
    out = {}
    for key, w in weights.items():
        out[key] = as_int4(w) if isinstance(w, BlockTensor) and w.ggml_type in INT4_TYPES and is_quantized_key(key) else w
        if out[key] is not w:
            hand_back_file_pages(w.raw, file_ranges)
    return out


def check_type(info: TensorInfo) -> str | None:
    """Why this project cannot use tensor `info`'s type, or None."""
    if info.ggml_type in SUPPORTED_TYPES:
        return None
    names = ", ".join(type_name(t) for t in SUPPORTED_TYPES)
    return f"tensor {info.name} has type {type_name(info.ggml_type)}, which this project does not read (it reads {names})"
