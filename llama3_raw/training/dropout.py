"""Dropout whose masks belong to the rows of the global batch, so that any number of ranks draws the same ones.

Each row of a step's global batch has its own random generator, seeded from (recipe seed, step, row): a rank
that holds rows 8..15 draws exactly the masks one process draws for those rows, and a resumed run draws the
masks the uninterrupted one did, without any generator state to save.

model.py, like Meta's, has no dropout: it marks the places training regularizes by calling `regularized`, which
returns its input. `forward_with` links the dropout to that name in model.py's own functions (linking.py), so
training runs the very code inference runs. It calls the dropout at every such place, in the same order on
every rank, so the k-th call of each row's generator is the same place in the model everywhere.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .. import model
from ..linking import linked

Dropout = Callable[[torch.Tensor], torch.Tensor] | None  # None: the model as Meta runs it


def row_seed(seed: int, step: int, row: int) -> int:
    """A well-mixed 63-bit seed for one row of one step (numpy's SeedSequence hashes the three together)."""
    return int(np.random.SeedSequence([seed, step, row]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class RowDropout:
    """Zero each activation with probability p (scaling the rest by 1 / (1 - p)), rows of a batch drawn apart."""

    p: float
    generators: list[torch.Generator]  # one per row of the local batch, in row order

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (b, S, D) -> (b, S, D)
        keep = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device) >= self.p for g in self.generators])
        return x * keep.to(x.dtype) / (1 - self.p)


def row_dropout(p: float, seed: int, step: int, rows: range, device="cpu") -> RowDropout | None:
    """The dropout for these global batch rows at this step; None (no dropout at all) when p is 0."""
    if p == 0:
        return None
    generators = [torch.Generator(device=device).manual_seed(row_seed(seed, step, row)) for row in rows]
    return RowDropout(p, generators)


def forward_with(dropout: Dropout, swap: Callable[[dict], dict] | None = None) -> Callable:
    """model.forward with `dropout` applied where model.py calls `regularized`, and a lab variant's pieces in
    place of Llama 3's (`swap`, training/variants.py); model.forward itself for neither."""
    if dropout is None and swap is None:
        return model.forward

    def replace(namespace: dict) -> dict:
        swapped = {} if swap is None else swap(namespace)
        return swapped if dropout is None else {**swapped, "regularized": dropout}

    return linked(model, replace)["forward"]
