"""Text generation: prefill the prompt once, then one token at a time through the KV cache.

`decode` is the one loop; `generate` streams one prompt's tokens through it; `generate_batch` runs several
prompts of different lengths as one batch (left-padded, see model.forward's `positions`) and gives each the
tokens it would get alone; a chat (chat.py) runs it on top of the cache its earlier turns filled.
"""

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from . import fast_forward
from .errors import UserError
from .model import KVCache, Weights, forward, new_kv_cache
from .parallel import SINGLE_PROCESS, Ranks
from .params import ModelParams


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy: always the most likely token
    top_p: float = 1.0  # keep the smallest set of tokens whose probability adds up to top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    seed: int | None = None


def sample_next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token id per row of logits (B, V) -> (B,)."""
    if not torch.isfinite(logits).all():  # else greedy picks garbage and sampling fails deep inside torch
        raise UserError("the model computed logits that are NaN or infinite: its weights (or a quantized file's "
                        "scales) hold values that are not finite; replace the checkpoint with an intact copy.")
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    if sampling.top_k > 0:
        sorted_probs[..., sampling.top_k:] = 0.0
    # Drop a token when the ones ranked above it already reach top_p (the top token always survives).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before > sampling.top_p] = 0.0
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs.cpu(), num_samples=1, generator=generator).to(sorted_ids.device)
    return sorted_ids.gather(-1, choice).squeeze(-1)


def seeded(sampling: Sampling) -> Sampling:
    """`sampling` with a seed: its own, or for a sampled run without one a fresh random seed, which the caller
    can report so that the run can be repeated; greedy decoding draws nothing and stays unseeded."""
    if sampling.temperature == 0 or sampling.seed is not None:
        return sampling
    return replace(sampling, seed=secrets.randbelow(2**31))


def new_generator(sampling: Sampling) -> torch.Generator | None:
    """The random generator sampling draws from (the one place it is seeded); None for greedy decoding."""
    if sampling.temperature == 0:
        return None
    return torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else torch.seed())


PAD_ID = 0  # any id works: pad slots are masked out of every real token's attention


def decode(
    weights: Weights, params: ModelParams, tokens: torch.Tensor, cache: KVCache, n_new: int,
    stop_ids: tuple[int, ...], sampling: Sampling, generator: torch.Generator | None, positions: torch.Tensor | None = None,
    ranks: Ranks = SINGLE_PROCESS, model_forward: Callable | None = None,
) -> Iterator[tuple[list[int], list[int]]]:
    """The decode loop every kind of generation runs: feed, pick a next token per row, feed those, ...

    `tokens` (B, S) continue the positions already in `cache` (the prefill: a prompt, or what is new in a
    chat). Each step yields (rows, ids): the batch rows still going and the token each picked. A row that
    picks a stop token is done and leaves the batch (its token is not yielded); the loop ends when no row
    is left or after `n_new` steps. Every yielded token is fed to the model before the next step's pick,
    except the last step's, which nothing reads. Under tensor parallelism every rank runs this loop on its
    slice of the model and takes rank 0's tokens, so the caches stay in step and all ranks stop together.
    `positions` (B, S): each row's own positions, for rows left-padded to a common length (model.forward).
    `model_forward`: another forward of model.forward's signature (a lab variant's, training/variants.py).
    """
    rows = list(range(tokens.shape[0]))  # the batch row each remaining row started as
    with torch.inference_mode():
        for _ in range(n_new):
            step = forward if fast_forward.tracing() else fast_forward.forward  # stepped through: model.py's own code
            step = step if model_forward is None else model_forward
            logits, cache = step(weights, params, tokens, cache, positions=positions, last_only=True, ranks=ranks)  # (B, 1, V)
            next_ids = ranks.same_on_every_rank(sample_next_token(logits[:, -1], sampling, generator))  # (B,)
            going = [i for i, token in enumerate(next_ids.tolist()) if token not in stop_ids]
            if not going:
                return
            if len(going) < len(rows):  # finished rows leave the batch, and their part of the cache with them
                keep = torch.tensor(going, device=next_ids.device)
                cache, next_ids = select_cache_rows(cache, keep), next_ids[keep]
                positions = None if positions is None else positions[keep]
                rows = [rows[i] for i in going]
            yield rows, next_ids.tolist()
            tokens = next_ids.view(-1, 1)  # (B, 1): from now on one token per row per step
            positions = None if positions is None else positions[:, -1:] + 1  # (B, 1): each row's next position


def generate(
    weights: Weights, params: ModelParams, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
    sampling: Sampling = Sampling(), cache_dtype: torch.dtype | None = None, device="cpu",
    ranks: Ranks = SINGLE_PROCESS, model_forward: Callable | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are chosen; stops at max_new_tokens, a stop token (not yielded), or the context's end."""
    # The k-th new token sits at position len(prompt) + k, which must stay inside the context.
    n_new = min(max_new_tokens, params.context_len - len(prompt_ids))
    if n_new <= 0:
        return
    dtype = cache_dtype or weights["tok_embeddings.weight"].dtype
    cache = new_kv_cache(params, batch_size=1, capacity=len(prompt_ids) + n_new, dtype=dtype, device=device, ranks=ranks)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, prompt_len): the prefill
    steps = decode(weights, params, tokens, cache, n_new, stop_ids, sampling, new_generator(sampling), ranks=ranks,
                   model_forward=model_forward)
    for _rows, (token,) in steps:
        yield token


def select_cache_rows(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """The cache of the given batch rows only (a copy): finished rows leave the batch."""
    return KVCache(tuple(k[rows] for k in cache.keys), tuple(v[rows] for v in cache.values), cache.length)


def generate_batch(
    weights: Weights, params: ModelParams, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
    sampling: Sampling = Sampling(), cache_dtype: torch.dtype | None = None, device="cpu",
    ranks: Ranks = SINGLE_PROCESS,
) -> list[list[int]]:
    """New token ids for each prompt, all generated in one batch.

    Prompts are left-padded to the longest one, so every row's next token sits in the same column.
    Every row gets at most min(max_new_tokens, context - longest prompt) tokens, so that all rows fit
    one cache. Greedy decoding gives each prompt the tokens it gets alone.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    longest = max(len(ids) for ids in prompts)
    n_new = min(max_new_tokens, params.context_len - longest)
    if n_new <= 0:
        return outputs
    dtype = cache_dtype or weights["tok_embeddings.weight"].dtype
    cache = new_kv_cache(params, batch_size=len(prompts), capacity=longest + n_new, dtype=dtype, device=device,
                         ranks=ranks)
    padding = torch.tensor([longest - len(ids) for ids in prompts], device=device)  # (B,)
    tokens = torch.tensor([[PAD_ID] * (longest - len(ids)) + ids for ids in prompts], device=device)  # (B, longest)
    positions = torch.arange(longest, device=device) - padding[:, None]  # (B, longest): each prompt's from 0, pads < 0
    steps = decode(weights, params, tokens, cache, n_new, stop_ids, sampling, new_generator(sampling), positions, ranks)
    for rows, ids in steps:
        for row, token in zip(rows, ids):
            outputs[row].append(token)
    return outputs
