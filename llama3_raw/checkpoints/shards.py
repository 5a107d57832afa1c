"""Meta's model-parallel checkpoints (70B: consolidated.00.pth ... consolidated.07.pth) merged into one flat dict.

Meta trained the big models with each weight matrix cut across GPUs; shard i holds GPU i's slice. A
ColumnParallelLinear (wq, wk, wv, w1, w3, output) is cut along its output rows, dim 0; a RowParallelLinear
(wo, w2) along its input columns, dim 1; Llama 3's VocabParallelEmbedding along the vocabulary, dim 0 (Llama 2
cut the embedding along dim 1); the norm weights are small and every shard holds the full copy.

The shards are read one at a time, memory-mapped, and each slice is copied into its place in tensors
allocated once at full size, so the process holds the merged weights plus at most one shard's pages.
"""

import gc
import re
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import UserError, notice
from ..params import ModelParams

SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")


def split_dim(key: str) -> int | None:
    """The dimension Meta's model parallelism cut `key` along; None for the replicated norms."""
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if key.endswith("norm.weight"):
        return None
    return 0  # tok_embeddings, wq, wk, wv, w1, w3, output


def numbered_shards(files: list[Path]) -> list[Path]:
    """The shard files in order, refusing a gap in the numbering (a shard that did not download)."""
    numbers = {}
    for path in files:
        match = SHARD_NAME.fullmatch(path.name)
        if match is None:
            raise UserError(f"{path} does not follow Meta's shard naming consolidated.NN.pth; rename or remove it.")
        numbers[int(match.group(1))] = path
    missing = [n for n in range(len(numbers)) if n not in numbers]
    if missing:
        directory = files[0].parent
        raise UserError(
            f"{directory} holds {len(files)} shard files but consolidated.{missing[0]:02d}.pth is missing "
            f"(numbers must run 00..{len(files) - 1:02d} without gaps); download the missing shard again."
        )
    return [numbers[n] for n in range(len(numbers))]


def merge_shards(paths: list[Path], params: ModelParams, read_state_dict, show_progress: bool = True,
                 say=notice) -> dict[str, torch.Tensor]:
    """One flat dict of full-size tensors (in shard 00's dtype) from Meta's model-parallel shards.

    `read_state_dict(path)` opens one shard memory-mapped (loading.read_state_dict). Each slice is checked
    against the shape params.json implies before the full tensor is allocated. A shard whose tensors have
    another dtype than shard 00's is converted, and `say` says so on stderr.
    """
    expected = params.weight_shapes()
    merged: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}  # how far along its split dimension each merged tensor is filled
    first_keys = None
    for index, path in enumerate(tqdm(paths, desc="merging shards", unit="shard", disable=not show_progress)):
        shard = read_state_dict(path)
        if first_keys is None:
            first_keys = set(shard)
            if "output.weight" not in shard:  # tied output (a 3.2-style checkpoint): no output slices anywhere
                del expected["output.weight"]
            check_key_set(shard, expected, path)
        elif set(shard) != first_keys:
            differ = sorted(set(shard) ^ first_keys)
            raise UserError(f"{path} holds different keys than {paths[0].name} (such as {differ[0]}); "
                            f"all shards must come from the same download.")
        converted = set()
        for key, full_shape in expected.items():
            piece = shard[key]
            check_piece(piece, full_shape, key, split_dim(key), filled.get(key, 0), index, path)
            if key not in merged:
                merged[key] = torch.empty(full_shape, dtype=piece.dtype)
                filled[key] = 0
            if piece.dtype != merged[key].dtype:
                converted.add(str(piece.dtype).removeprefix("torch."))
            place_piece(merged[key], piece, key, split_dim(key), filled, index, path)
        if converted:
            say(f"note: {path} holds {', '.join(sorted(converted))} tensors, converted to shard 00's "
                   f"{str(next(iter(merged.values())).dtype).removeprefix('torch.')}")
        del shard
        gc.collect()  # drop this shard's memory map before the next one is opened
    for key, full_shape in expected.items():
        dim = split_dim(key)
        if dim is not None and filled[key] != full_shape[dim]:
            raise UserError(
                f"the {len(paths)} shards in {paths[0].parent} give {key} {filled[key]} along dim {dim} but "
                f"params.json implies {full_shape[dim]}; a shard is missing or params.json belongs to another model."
            )
    return merged


def check_key_set(shard: dict, expected: dict, path: Path) -> None:
    missing = [k for k in expected if k not in shard]
    extra = [k for k in shard if k not in expected]
    if missing or extra:
        example = (missing or extra)[0]
        raise UserError(f"{path} does not match its params.json ({len(missing)} missing and {len(extra)} unexpected "
                        f"key(s), such as {example}); make sure params.json and the shards come from the same download.")


def check_piece(piece: torch.Tensor, full_shape: tuple[int, ...], key: str, dim: int | None, start: int,
                index: int, path: Path) -> None:
    """One shard's slice of `key` must be floating point and fit the full shape params.json implies, from
    `start` along the split dimension: checked before the full tensor is allocated (a params.json saying
    dim 1e9 must not cost terabytes first)."""
    if not piece.is_floating_point():
        raise UserError(f"{path}: {key} has dtype {piece.dtype}, not a floating-point type; download the shard again.")
    if dim is None:  # a replicated norm: the whole tensor in every shard
        if tuple(piece.shape) != tuple(full_shape):
            raise UserError(f"{path}: {key} has shape {tuple(piece.shape)} but params.json implies "
                            f"{tuple(full_shape)}; make sure params.json and the shards come from the same download.")
        return
    fits = piece.dim() == len(full_shape) and start + piece.shape[dim] <= full_shape[dim] and all(
        piece.shape[d] == full_shape[d] for d in range(len(full_shape)) if d != dim)
    if not fits:
        raise UserError(
            f"{path}: {key} has shape {tuple(piece.shape)}, which does not fit shard {index} of a {key} of shape "
            f"{tuple(full_shape)} split along dim {dim}; make sure params.json and all shards come from the same download."
        )


def place_piece(full: torch.Tensor, piece: torch.Tensor, key: str, dim: int | None, filled: dict,
                index: int, path: Path) -> None:
    """Copy one shard's slice of `key` (checked by check_piece) into the merged tensor."""
    if dim is None:  # a replicated norm: every shard must hold the same values
        if index == 0:
            full.copy_(piece)
        elif not torch.equal(full, piece.to(full.dtype)):
            raise UserError(f"{path}: {key} differs from the copy in shard 00 though norms are replicated; "
                            f"the shards come from different downloads, download them again together.")
        return
    start, size = filled[key], piece.shape[dim]
    full.narrow(dim, start, size).copy_(piece)  # (rows or columns start..start+size) <- this shard's slice
    filled[key] = start + size


def keep_kv_heads_once(weights: dict[str, torch.Tensor], params: ModelParams) -> tuple[dict, ModelParams]:
    """Merged weights with each key/value head once, and params that say so.

    Meta's files for more ranks than the model has kv heads (405B on 16 ranks: 8 kv heads) declare one kv
    head per rank and store each real head once per rank that reads it, next to each other. Merged, wk and
    wv hold every head `copies` times in a row; kept so, the KV cache would be `copies` times too big.
    """
    n_kv, head_dim = params.n_kv_heads, params.head_dim
    layers = [(f"layers.{i}.attention.wk.weight", f"layers.{i}.attention.wv.weight") for i in range(params.n_layers)]

    def repeated(copies: int) -> bool:
        for key in (k for pair in layers for k in pair):
            heads = weights[key].view(n_kv // copies, copies, head_dim, -1)
            if not torch.equal(heads, heads[:, :1].expand_as(heads)):
                return False
        return True

    for copies in (c for c in range(n_kv, 1, -1) if n_kv % c == 0 and params.n_heads % (n_kv // c) == 0):
        if repeated(copies):
            kept = dict(weights)
            for key in (k for pair in layers for k in pair):
                kept[key] = weights[key].view(n_kv // copies, copies, head_dim, -1)[:, 0].reshape(-1, params.dim).clone()
            return kept, replace(params, n_kv_heads=n_kv // copies)
    return weights, params
