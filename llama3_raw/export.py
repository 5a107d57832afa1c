"""Write trained weights as a checkpoint in Meta's own format, loadable by Meta's reference code unchanged.

consolidated.00.pth  bf16 tensors, Meta's key names, shapes and order (output.weight included)
params.json          Meta's fields only (never max_seq_len: Meta passes it separately and would crash)
tokenizer.model      the trained BPE ranks, tiktoken format
generation.json      this model's defaults for run.py (prompt, temperature, ...)
"""

import json
import os
from pathlib import Path

import torch

from .params import ModelParams


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def meta_state_dict(weights: dict[str, torch.Tensor], params: ModelParams) -> dict[str, torch.Tensor]:
    """bf16 copies in Meta's key order, detached from autograd."""
    return {key: weights[key].detach().to(torch.bfloat16).contiguous().clone() for key in params.weight_shapes()}


def export_checkpoint(out_dir: Path, weights: dict[str, torch.Tensor], params: ModelParams,
                      tokenizer_bytes: bytes, generation: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    params_json = params.to_json_dict()
    params_json.pop("max_seq_len", None)
    atomic_torch_save(meta_state_dict(weights, params), out_dir / "consolidated.00.pth")
    atomic_write_bytes(out_dir / "params.json", (json.dumps(params_json, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "tokenizer.model", tokenizer_bytes)
    if generation:
        atomic_write_bytes(out_dir / "generation.json", (json.dumps(generation, indent=2) + "\n").encode())
