"""Tensor parallelism as data: where this process stands among the ranks that share one model.

Meta ran its big models (70B on 8 GPUs, 405B on 16) with every weight matrix cut across ranks, and
its checkpoints are stored that way, one `consolidated.NN.pth` per rank. Each rank holds a slice:

    wq, wk, wv, w1, w3, output, tok_embeddings   rows (dim 0): the rank computes some of the outputs
    wo, w2                                        columns (dim 1): the rank computes part of every output
    the norms                                     whole, on every rank

so the forward pass communicates in exactly four places (model.py): the embedding lookup (each rank
knows only its part of the vocabulary), the attention output after `wo` and the feed-forward output
after `w2` (partial sums, added up over the ranks), and the logits (each rank has some of the
vocabulary's). `Ranks` carries what those places need. The default, `SINGLE_PROCESS`, runs none of it.
"""

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError, first_line
from .params import ModelParams

COLLECTIVE_TIMEOUT_S = 120  # how long a rank waits for the others (to join, or in a collective) before giving up
TIMEOUT_ENV = "LLAMA3_RAW_RANK_TIMEOUT_S"  # ... unless this environment variable says otherwise


@dataclass(frozen=True)
class Ranks:
    """This process's place in a tensor-parallel group: rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    group: object = None  # the torch.distributed process group; None: the default group

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of every rank's `partial` (in place); identity for one process."""
        if self.world_size > 1:
            with peers_answer(self):
                dist.all_reduce(partial, group=self.group)
        return partial

    def all_gather(self, piece: torch.Tensor) -> torch.Tensor:
        """Every rank's `piece` side by side along the last dimension, in rank order."""
        if self.world_size == 1:
            return piece
        pieces = [torch.empty_like(piece) for _ in range(self.world_size)]
        with peers_answer(self):
            dist.all_gather(pieces, piece.contiguous(), group=self.group)
        return torch.cat(pieces, dim=-1)

    def same_on_every_rank(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's `values` on every rank, so that sampled tokens (and the caches) stay in step."""
        if self.world_size > 1:
            with peers_answer(self):
                dist.broadcast(values, src=self.global_rank(0), group=self.group)
        return values

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def local_heads(self, params: ModelParams) -> tuple[int, int]:
        """(query heads, key/value heads) this rank computes and caches.

        Query heads are shared out evenly. With at least as many kv heads as ranks, so are the kv heads;
        with fewer (8B's 8 kv heads on 16 ranks), each rank holds the one kv head its query heads read.
        """
        kv_heads = params.n_kv_heads // self.world_size if params.n_kv_heads >= self.world_size else 1
        return params.n_heads // self.world_size, kv_heads

    def embedding_rows(self, table_slice: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each token id's embedding row (B, S) -> (B, S, D) when this rank holds rows rank * n .. rank * n + n - 1
        of the table (Meta's VocabParallelEmbedding): ids outside the slice look up zero rows, and the sum over
        the ranks, where exactly one rank holds each id, is the whole lookup."""
        local_ids = tokens - self.rank * table_slice.shape[0]
        outside = (local_ids < 0) | (local_ids >= table_slice.shape[0])  # (B, S): ids another rank holds
        rows = table_slice[local_ids.masked_fill(outside, 0)].masked_fill(outside[..., None], 0)
        return self.all_reduce(rows)


SINGLE_PROCESS = Ranks()


@contextlib.contextmanager
def peers_answer(ranks: Ranks):
    """Turn a collective that failed because another rank died or went silent into one sentence."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        raise UserError(f"rank {ranks.rank} of {ranks.world_size}: another rank stopped or did not answer within "
                        f"{rank_timeout_s():g} s ({first_line(err, 200)}); see the first rank's error.") from None


def launched_ranks() -> int:
    """How many ranks torchrun started (its WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_timeout_s() -> float:
    """COLLECTIVE_TIMEOUT_S, or the seconds that $LLAMA3_RAW_RANK_TIMEOUT_S gives."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 86400:
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds between 0 and 86400; set it to, say, 60, "
                        f"or unset it for {COLLECTIVE_TIMEOUT_S} s.")
    return seconds


def join_ranks(device: str, timeout_s: float | None = None) -> tuple[Ranks, str]:
    """Under torchrun, join the other ranks (gloo on the CPU, NCCL on CUDA, one GPU per local rank) and
    return (this rank's Ranks, its device). Without torchrun: (SINGLE_PROCESS, device), nothing joined."""
    if launched_ranks() == 1:
        return SINGLE_PROCESS, device
    timeout_s = timeout_s or rank_timeout_s()
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, dist.DistError) as err:
        raise UserError(f"rank {os.environ.get('RANK', '?')} could not join the other ranks within {timeout_s:.0f} s "
                        f"({first_line(err, 200)}); check torchrun's --rdzv-endpoint / --master-addr and that every node "
                        f"started.") from None
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def wait_for_peers(ranks: Ranks, timeout_s: float = 30) -> None:
    """Wait (a bounded time) until the other ranks arrive here too: ranks that fail the same check then all say
    so before the first one's exit makes torchrun stop the rest."""
    if ranks.world_size > 1 and dist.is_initialized() and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
        except (RuntimeError, dist.DistError):
            pass  # some rank did not come: it failed elsewhere, and says so itself


@contextlib.contextmanager
def only_rank_zero_prints(ranks: Ranks):
    """Ranks other than 0 print nothing inside (their errors still reach stderr: they are printed after it)."""
    if ranks.rank == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def as_one_of(ranks: Ranks):
    """A command's body on every rank: rank 0 alone prints; a UserError on any rank is said by that rank, which
    waits (a bounded time) for the others and exits with code 2; the ranks leave the process group together.
    In one process a UserError goes up unchanged, to events.run_tool."""
    try:
        with only_rank_zero_prints(ranks):
            yield
    except UserError as err:
        if ranks.world_size == 1:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)  # every rank says it, then they stop together
        wait_for_peers(ranks)
        raise SystemExit(2) from None
    else:  # done: leave together (a gloo rank whose peer leaves while it still talks to it can abort)
        wait_for_peers(ranks, rank_timeout_s())
    finally:
        leave_ranks(ranks)


def leave_ranks(ranks: Ranks) -> None:
    if ranks.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
