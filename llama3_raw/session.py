"""A checkpoint folder opened for use: params, tokenizer, weights in the compute dtype, the folder's defaults.

The command-line tools (run, inspect, compare, score) all start here, so they check the same things
in the same order: cheap files first (params.json, tokenizer, vocabulary), the weights last.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .loading import cast_weights, checkpoint_params, default_tokenizer_path, is_int8, load_checkpoint
from .params import ModelParams
from .tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class Session:
    directory: Path
    params: ModelParams
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]  # in `dtype`, on `device`
    dtype: torch.dtype
    device: str


def tool_parser(prog: str, description: str, with_prompt: bool = True) -> argparse.ArgumentParser:
    """The arguments every tool shares: an optional prompt, --ckpt-dir and --tokenizer."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if with_prompt:
        parser.add_argument("prompt", nargs="?", help="text to run (default: the model's default prompt)")
    parser.add_argument("--ckpt-dir", type=Path, help="checkpoint folder (default: as run.py chooses)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one beside the checkpoint)")
    return parser


def open_tokenizer(ckpt_dir: Path, params: ModelParams, tokenizer_path: str | None) -> Tokenizer:
    """The tokenizer beside the checkpoint (or the given one), checked against the weights' vocabulary."""
    if tokenizer_path is not None and "://" not in tokenizer_path and not Path(tokenizer_path).is_file():
        raise UserError(f"--tokenizer {tokenizer_path} does not exist; pass the path of a tokenizer.model file.")
    path = tokenizer_path or str(default_tokenizer_path(ckpt_dir))
    tokenizer = load_tokenizer(path)
    if tokenizer.n_words != params.vocab_size:
        raise UserError(
            f"tokenizer {path} has {tokenizer.n_words} tokens but the checkpoint in {ckpt_dir} says vocab_size "
            f"{params.vocab_size}; use the tokenizer.model that came with these weights."
        )
    return tokenizer


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu.")


def open_params(ckpt_dir: Path) -> ModelParams:
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint directory {ckpt_dir} does not exist; pass --ckpt-dir with the folder holding "
                        f"params.json and consolidated.00.pth.")
    return checkpoint_params(ckpt_dir)


def open_session(ckpt_dir: Path, tokenizer_path: str | None, dtype: torch.dtype | str, device: str,
                 show_progress: bool = True) -> Session:
    """Everything needed to run the model; `dtype` may be "auto" (see choose_dtype)."""
    from .cli import choose_dtype  # the CLI owns the policy for "auto"

    check_device(device)
    params = open_params(ckpt_dir)
    tokenizer = open_tokenizer(ckpt_dir, params, tokenizer_path)
    checkpoint = load_checkpoint(ckpt_dir, show_progress=show_progress)
    if is_int8(checkpoint.weights):  # saved by --save-quantized: int8 matrices compute with bf16 activations
        if dtype not in ("auto", torch.bfloat16, "bfloat16"):
            raise UserError(f"{ckpt_dir} holds int8 weights, which compute in bfloat16; pass --dtype bfloat16.")
        dtype = torch.bfloat16
    if isinstance(dtype, str):
        dtype = choose_dtype(dtype, device, checkpoint.weights)
    weights = cast_weights(checkpoint.weights, dtype, device, show_progress=show_progress)
    return Session(ckpt_dir, params, tokenizer, weights, dtype, device)
