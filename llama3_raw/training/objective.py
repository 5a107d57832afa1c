"""The pieces of training, as plain functions: initial weights, batches, loss, learning rate, validation.

Training runs the very `forward` that inference runs: the weights are a flat dict of leaf tensors
with Meta's key names, and autograd differentiates straight through the functional forward pass.

Every window starts with <|begin_of_text|>, because run.py (like Meta's generation) always encodes
the prompt with it: input = [BOS, t0 .. t(C-2)], targets = [t0 .. t(C-1)], so each of the C tokens
is predicted once, the first from BOS alone. Validation uses the same windows, back to back.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..params import ModelParams
from .dropout import Dropout, forward_with
from .variants import Swap
from .recipe import TrainSettings

RESIDUAL_PROJECTIONS = ("attention.wo.weight", "feed_forward.w2.weight")  # they write into the residual stream


def init_weights(params: ModelParams, settings: TrainSettings, generator: torch.Generator,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """fp32 leaf tensors: normal(0, init_std) matrices, residual projections scaled by 1/sqrt(2 * n_layers)
    (2 writes per block, so the residual stream's variance does not grow with depth), norms at one.
    `shapes`: a lab variant's weights (training/variants.py) instead of the params' own."""
    weights = {}
    for key, shape in (params.weight_shapes() if shapes is None else shapes).items():
        if len(shape) == 1:
            tensor = torch.ones(shape)
        else:
            std = settings.init_std
            if key.endswith(RESIDUAL_PROJECTIONS):
                std /= math.sqrt(2 * params.n_layers)
            tensor = torch.randn(shape, generator=generator) * std
        weights[key] = tensor.requires_grad_(True)
    return weights


def param_groups(weights: dict[str, torch.Tensor], weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections); never the RMSNorm gains, which would be pulled toward 0."""
    matrices = [w for w in weights.values() if w.ndim >= 2]
    vectors = [w for w in weights.values() if w.ndim < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine down to min_lr at the last step (step counts from 0)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - 1 - settings.warmup_steps)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def with_bos(targets: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, C) targets -> (B, C) inputs: BOS, then each target's predecessor."""
    bos = torch.full((targets.shape[0], 1), bos_id, dtype=targets.dtype, device=targets.device)
    return torch.cat([bos, targets[:, :-1]], dim=1)


def sample_batch(ids: torch.Tensor, context: int, batch_size: int, bos_id: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `context` tokens: (inputs, targets), both (B, C) long."""
    starts = torch.randint(0, len(ids) - context + 1, (batch_size,), generator=generator)
    targets = torch.stack([ids[s:s + context] for s in starts.tolist()])  # (B, C)
    return with_bos(targets, bos_id), targets


def batch_loss(weights: dict[str, torch.Tensor], params: ModelParams, inputs: torch.Tensor,
               targets: torch.Tensor, reduction: str = "mean", dropout: Dropout = None,
               swap: Swap | None = None) -> torch.Tensor:
    """Cross entropy in nats per token of the model's next-token predictions (with `dropout` in training only;
    `swap`: a lab variant's pieces, training/variants.py)."""
    logits, _ = forward_with(dropout, swap)(weights, params, inputs)  # (B, C, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def validation_windows(ids: np.ndarray, context: int, max_windows: int | None = None) -> list[np.ndarray]:
    """The validation stream cut into consecutive windows of `context` tokens (the last may be shorter)."""
    windows = [ids[i:i + context] for i in range(0, len(ids), context)]
    return windows if max_windows is None else windows[:max_windows]


@torch.no_grad()
def validation_nll(weights: dict[str, torch.Tensor], params: ModelParams, windows: list[np.ndarray],
                   bos_id: int, batch_size: int, device="cpu", swap: Swap | None = None) -> float:
    """Total negative log-likelihood (nats) of every token in `windows`, each window starting from BOS."""
    total = 0.0
    full = [w for w in windows if len(w) == len(windows[0])]
    ragged = [w for w in windows if len(w) != len(windows[0])]
    for i in range(0, len(full), batch_size):
        targets = torch.from_numpy(np.stack(full[i:i + batch_size]).astype(np.int64)).to(device)  # (b, C)
        total += batch_loss(weights, params, with_bos(targets, bos_id), targets, reduction="sum", swap=swap).item()
    for window in ragged:
        targets = torch.from_numpy(window.astype(np.int64))[None].to(device)  # (1, c)
        total += batch_loss(weights, params, with_bos(targets, bos_id), targets, reduction="sum", swap=swap).item()
    return total
