"""Data parallelism: every rank holds the whole model and trains on its rows of each global batch.

All ranks draw the same global batch from the same generator (the recipe's seed) and each keeps its own
contiguous rows. A rank's loss is its rows' mean weighted by its share of the rows, so the gradients summed
over the ranks (one all_reduce before the optimizer step) are the gradient of the global batch's mean loss:
N ranks follow the trajectory of one process, to fp32 rounding. The generator, weights and optimizer state
are then the same on every rank, which is why rank 0's state resumes under any number of ranks.

One process (no torchrun) runs none of this: its rows are the whole batch, with weight exactly 1.
"""

import torch
import torch.distributed as dist

from ..errors import UserError
from ..parallel import Ranks, peers_answer


def rows_of_rank(batch_size: int, ranks: Ranks) -> range:
    """This rank's rows of the global batch: as even a share as the division allows, in rank order."""
    return range(ranks.rank * batch_size // ranks.world_size, (ranks.rank + 1) * batch_size // ranks.world_size)


def check_batch_shares(batch_size: int, ranks: Ranks, source) -> None:
    if ranks.world_size > batch_size:
        raise UserError(f"--config {source}: train.batch_size {batch_size} is the global batch, and {ranks.world_size} "
                        f"ranks would leave some without a row; start at most {batch_size} ranks or raise it.")


def sum_gradients(weights: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Every weight's .grad becomes the sum over the ranks of theirs: one all_reduce over one flat buffer."""
    if ranks.world_size == 1:
        return
    grads = [w.grad for w in weights.values()]
    flat = ranks.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sum_over_ranks(value: float, ranks: Ranks, device="cpu") -> float:
    """A number summed over the ranks (in float64, so that the sum does not depend on how it is shared out)."""
    if ranks.world_size == 1:
        return value
    return ranks.all_reduce(torch.tensor([value], dtype=torch.float64, device=device)).item()


def from_rank_zero(value, ranks: Ranks):
    """Rank 0's `value` (any picklable object: a resumed state, the tokenizer's bytes) on every rank."""
    if ranks.world_size == 1:
        return value
    box = [value if ranks.rank == 0 else None]
    with peers_answer(ranks):
        dist.broadcast_object_list(box, src=0)
    return box[0]
