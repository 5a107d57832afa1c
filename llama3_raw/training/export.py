"""Write trained weights as a checkpoint in Meta's own format, loadable by Meta's reference code unchanged.

consolidated.00.pth  bf16 tensors, Meta's key names, shapes and order (output.weight included)
params.json          Meta's fields only (never max_seq_len: Meta passes it separately and would crash)
tokenizer.model      the trained BPE ranks, tiktoken format
generation.json      this model's defaults for run.py (prompt, temperature, ...)
"""

from pathlib import Path

import torch

from ..files import atomic_path, write_bytes, write_json
from ..params import ModelParams


def meta_state_dict(weights: dict[str, torch.Tensor], params: ModelParams) -> dict[str, torch.Tensor]:
    """bf16 copies on the CPU (wherever training ran) in Meta's key order, detached from autograd."""
    return {key: weights[key].detach().to("cpu", torch.bfloat16).contiguous().clone() for key in params.weight_shapes()}


def export_checkpoint(out_dir: Path, weights: dict[str, torch.Tensor], params: ModelParams,
                      tokenizer_bytes: bytes, generation: dict | None = None) -> None:
    """Each file is replaced atomically (files.py), so the folder always holds whole files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params_json = params.to_json_dict()
    params_json.pop("max_seq_len", None)
    with atomic_path(out_dir / "consolidated.00.pth") as temporary:
        torch.save(meta_state_dict(weights, params), temporary)
    write_json(out_dir / "params.json", params_json)
    write_bytes(out_dir / "tokenizer.model", tokenizer_bytes)
    if generation:
        write_json(out_dir / "generation.json", generation)
