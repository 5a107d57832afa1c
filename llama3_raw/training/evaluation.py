"""What a run measures at each evaluation: the validation loss (its windows shared out among the ranks) and a
short sample from the recipe's prompt, so that a learner watches the model learn to write.

Neither ever applies dropout: they call the model exactly as inference does.
"""

import contextlib
from dataclasses import replace

import numpy as np
import torch

from ..checkpoints.defaults import BUILTIN_DEFAULTS
from ..generate import Sampling, generate
from ..parallel import Ranks
from ..params import ModelParams
from ..tokenizer import Tokenizer
from .data import Split
from .data_parallel import sum_over_ranks
from .dropout import forward_with
from .objective import validation_nll, validation_windows
from .recipe import TrainSettings
from .variants import Swap

SAMPLE_TOKENS = 64  # at most this many new tokens per sample: a few lines, seconds on a CPU


def autocast(device: str):
    """bf16 autocast on CUDA (weights and optimizer state stay fp32); nothing on the CPU, which trains in fp32."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def validation_record(weights: dict[str, torch.Tensor], params: ModelParams, val_split: Split, tokenizer: Tokenizer,
                      settings: TrainSettings, step: int, final: bool, ranks: Ranks, device: str,
                      swap: Swap | None = None) -> dict:
    """Validation loss on the first eval_windows windows of the split, or (final) all of it; each rank scores
    every world_size-th window and the sums are added up."""
    windows = validation_windows(val_split.ids, settings.context, None if final else settings.eval_windows)
    chars = len(tokenizer.decode(np.concatenate(windows).tolist()))
    with autocast(device):
        nll = validation_nll(weights, params, windows[ranks.rank::ranks.world_size], tokenizer.bos_id,
                             settings.batch_size, device, swap)
    nll = sum_over_ranks(nll, ranks, device)
    n_tokens = sum(len(w) for w in windows)
    return {"kind": "val", "step": step, "nats_per_char": nll / chars, "nats_per_token": nll / n_tokens,
            "tokens": n_tokens, "chars": chars, "full": final}


def sample_text(weights: dict[str, torch.Tensor], params: ModelParams, tokenizer: Tokenizer, generation: dict,
                settings: TrainSettings, device: str, swap: Swap | None = None) -> str:
    """The recipe's prompt and what the model writes after it, with the recipe's generation settings (run.py's
    defaults for those it leaves out) and the recipe's seed (the same draws at every evaluation: what changes is the model)."""
    generation = BUILTIN_DEFAULTS | generation  # what run.py fills in for the exported generation.json too
    sampling = Sampling(temperature=generation["temperature"], top_p=generation["top_p"], top_k=generation["top_k"],
                        seed=settings.seed)
    prompt, n_new = generation["prompt"], min(generation["max_new_tokens"], SAMPLE_TOKENS)
    trained_for = replace(params, max_seq_len=settings.context)  # positions past the training context are untrained
    ids = generate(weights, trained_for, tokenizer.encode(prompt, bos=True), n_new, tokenizer.stop_ids, sampling,
                   device=device, model_forward=None if swap is None else forward_with(None, swap))
    return prompt + tokenizer.decode(list(ids))
