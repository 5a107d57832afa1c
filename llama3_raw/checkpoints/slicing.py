"""A tensor-parallel rank's slice of a checkpoint: only the rows or columns that rank computes with.

Rank r of N holds, of every weight (see parallel.py for why these dimensions):
    wq, w1, w3, output, tok_embeddings   rows     r*G/N .. (r+1)*G/N   (G: the full size of that dimension)
    wk, wv                               rows of the kv heads its query heads read
    wo, w2                               columns  r*G/N .. (r+1)*G/N
    norms                                whole

Meta's files are themselves such slices, one per rank of the run that saved them (F files). A rank reads
only the files that hold its part: with N == F its own file, memory-mapped as it is (no copy); with N a
divisor of F, its F/N consecutive files, concatenated (the existing merge, per rank); with N a multiple
of F, the one file holding its part, from which it takes a view (copied only where a view cannot serve).
"""

from pathlib import Path

import torch

from ..errors import UserError
from ..parallel import Ranks
from ..params import ModelParams
from ..int4_layouts import cpu_block_rows
from ..quantize import Int4Weight, Int8Weight, check_int4_shape
from .meta import read_state_dict
from .shards import split_dim


def check_rank_count(params: ModelParams, world_size: int, n_files: int, ckpt_dir: Path) -> None:
    """Refuse, before any weight is read, a number of ranks that cannot share this model evenly."""
    def fits(n: int) -> bool:
        kv_ok = params.n_kv_heads % n == 0 or n % params.n_kv_heads == 0
        sizes_ok = all(size % n == 0 for size in (params.n_heads, params.ffn_hidden_dim, params.vocab_size))
        return kv_ok and sizes_ok and (n % n_files == 0 or n_files % n == 0)

    if not fits(world_size):
        working = [n for n in range(1, 2 * params.n_heads + 1) if fits(n) and params.n_heads % n == 0]
        raise UserError(
            f"{ckpt_dir} cannot be shared by {world_size} ranks: {params.n_heads} query heads, {params.n_kv_heads} kv "
            f"heads, FFN hidden size {params.ffn_hidden_dim}, vocabulary {params.vocab_size} and {n_files} shard "
            f"file(s) must each divide evenly among them; run with --nproc-per-node (x --nnodes) in "
            f"{', '.join(map(str, working))}.")


def rank_range(key: str, full_shape: tuple[int, ...], params: ModelParams, ranks: Ranks) -> tuple[int | None, int, int]:
    """(dimension, start, stop) of the rank's part of `key` in the full tensor; dimension None: the whole tensor."""
    dim = split_dim(key)
    if dim is None:
        return None, 0, full_shape[0]
    if key.endswith(("attention.wk.weight", "attention.wv.weight")):
        n_heads, n_kv_heads = ranks.local_heads(params)
        first_query_head = ranks.rank * n_heads
        first_kv_head = first_query_head // params.heads_per_kv_head  # the kv head that query head reads
        return 0, first_kv_head * params.head_dim, (first_kv_head + n_kv_heads) * params.head_dim
    share = full_shape[dim] // ranks.world_size
    return dim, ranks.rank * share, (ranks.rank + 1) * share


def slice_of(tensor: torch.Tensor, dim: int | None, start: int, stop: int) -> torch.Tensor:
    """The range as a view when it is one (whole rows); columns are copied so products read them contiguously."""
    if dim is None:
        return tensor
    part = tensor.narrow(dim, start, stop - start)
    return part if part.is_contiguous() else part.contiguous()


def load_rank_files(files: list[Path], params: ModelParams, ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's slice of every tensor of Meta's consolidated.NN.pth `files` (numbered 00..NN), reading only
    the files it needs. The caller has checked that the rank count fits (check_rank_count)."""
    opened: dict[int, dict[str, torch.Tensor]] = {}  # file index -> its memory-mapped tensors
    weights, replicated = {}, []
    for key, full_shape in params.weight_shapes().items():
        dim, start, stop = rank_range(key, full_shape, params, ranks)
        if dim is None:
            replicated.append(key)
            continue
        per_file = full_shape[dim] // len(files)
        pieces = []
        for index in range(start // per_file, (stop - 1) // per_file + 1):  # the files that hold part of the range
            state = read_shard(files, index, opened)
            if key not in state:
                break  # no output.weight: a tied output, as in a single file
            check_piece(state[key], key, full_shape, dim, per_file, files[index])
            offset = index * per_file
            lo, hi = max(start, offset) - offset, min(stop, offset + per_file) - offset
            if dim == 1 and hi - lo < per_file:
                pieces.append(columns_of(files[index], key, lo, hi))
            else:
                pieces.append(slice_of(state[key], dim, lo, hi))
        if pieces:
            weights[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
    any_file = next(iter(opened.values()))
    for key in replicated:  # the norms: every file holds them whole
        if key in any_file:
            weights[key] = any_file[key]
    return weights


def columns_of(path: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Columns start..stop of `key`, copied out of a mapping of the file made for this copy alone.

    Every row holds some of the rank's columns, so copying them reads all of the matrix's pages; once this
    mapping is dropped they are no longer part of the process (only the rank's copy is), where through the
    long-lived mapping they would stay resident: the whole of wo and w2 on every rank.
    """
    return read_state_dict(path)[key][:, start:stop].contiguous()


def read_shard(files: list[Path], index: int, opened: dict) -> dict[str, torch.Tensor]:
    if index not in opened:
        opened[index] = read_state_dict(files[index])
    return opened[index]


def check_piece(piece: torch.Tensor, key: str, full_shape: tuple, dim: int, per_file: int, path: Path) -> None:
    expected = tuple(per_file if d == dim else size for d, size in enumerate(full_shape))
    if tuple(piece.shape) != expected:
        raise UserError(f"{path}: {key} has shape {tuple(piece.shape)} but a shard of this checkpoint should hold "
                        f"{expected}; make sure params.json and all shards come from the same download.")


def rank_shapes(params: ModelParams, ranks: Ranks) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape on this rank."""
    shapes = {}
    for key, full_shape in params.weight_shapes().items():
        dim, start, stop = rank_range(key, full_shape, params, ranks)
        shapes[key] = full_shape if dim is None else tuple(stop - start if d == dim else n for d, n in enumerate(full_shape))
    return shapes


def slice_whole(weights: dict, params: ModelParams, ranks: Ranks, copy: bool = False) -> dict:
    """This rank's slice of a checkpoint read whole (one file, Hugging Face, saved int8): views of the mapped
    file where possible. `copy`: the whole tensors are copies (Hugging Face's re-ordered wq, wk), so the
    slices are copied too and the whole ones can go. The caller has checked that the rank count fits."""
    out = {}
    for key, full_shape in params.weight_shapes().items():
        if key in weights:
            check_int4_part(key, weights[key], *rank_range(key, full_shape, params, ranks))
            part = slice_weight(weights[key], *rank_range(key, full_shape, params, ranks))
            out[key] = part.clone() if copy and isinstance(part, torch.Tensor) and part is not weights[key] else part
    return out


def slice_weight(weight, dim: int | None, start: int, stop: int):
    """A tensor's range, or a quantized matrix's: its values' range, and the scales of the rows it keeps
    (int4: of the rows and the input groups it keeps; its values are two to a byte, in the plain layout)."""
    if isinstance(weight, Int8Weight):
        scales = weight.scales if dim != 0 else weight.scales[start:stop]
        return Int8Weight(slice_of(weight.values, dim, start, stop), scales)
    if isinstance(weight, Int4Weight):
        arrangement = cpu_block_rows()  # (BLOCK_N, halves), or None
        block = arrangement[0] if arrangement is not None else None
        whole_blocks = block is not None and start % block == 0 and (stop % block == 0 or stop == weight.shape[0])
        if weight.layout == "cpu" and dim is not None and not (dim == 0 and whole_blocks):
            # only whole blocks of rows of the CPU arrangement are a view; else cut from the plain layout (a copy)
            weight = Int4Weight(weight.plain(), weight.scales_and_zeros, weight.in_features)
        if dim == 0:
            return Int4Weight(weight.packed[start:stop], weight.scales_and_zeros[:, start:stop], weight.in_features,
                              weight.layout)
        if dim == 1:
            groups = slice(start // weight.group_size, stop // weight.group_size)
            return Int4Weight(weight.packed[:, start // 2:stop // 2], weight.scales_and_zeros[groups], stop - start)
        return weight
    return slice_of(weight, dim, start, stop)


def check_int4_part(key: str, weight, dim: int | None, start: int, stop: int) -> None:
    """A rank's part of a saved int4 matrix must keep whole groups and suit the int4 kernels."""
    if not isinstance(weight, Int4Weight) or dim is None:
        return
    shape = (stop - start, weight.in_features) if dim == 0 else (weight.shape[0], stop - start)
    problem = check_int4_shape(shape, weight.group_size)
    if dim == 1 and start % weight.group_size:
        problem = f"its inputs from {start} on do not start a group of {weight.group_size}"
    if problem:
        raise UserError(f"a rank's part of the int4 matrix {key} cannot be multiplied: {problem}; run on fewer ranks, "
                        f"or save the int4 weights again with a smaller --group-size.")
