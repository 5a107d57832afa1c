"""Text generation: prefill the prompt once, then one token at a time through the KV cache."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .model import Weights, forward, new_kv_cache
from .params import ModelParams


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy: always the most likely token
    top_p: float = 1.0  # keep the smallest set of tokens whose probability adds up to top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 keeps all
    seed: int | None = None


def sample_next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token id per row of logits (B, V) -> (B,)."""
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


def generate(
    weights: Weights, params: ModelParams, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...],
    sampling: Sampling = Sampling(), cache_dtype: torch.dtype | None = None, device="cpu",
) -> Iterator[int]:
    """Yield new token ids as they are chosen; stops at max_new_tokens, a stop token (not yielded), or the context's end."""
    # The k-th new token sits at position len(prompt) + k, which must stay inside the context.
    n_new = min(max_new_tokens, params.context_len - len(prompt_ids))
    if n_new <= 0:
        return
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    dtype = cache_dtype or weights["tok_embeddings.weight"].dtype
    cache = new_kv_cache(params, batch_size=1, capacity=len(prompt_ids) + n_new, dtype=dtype, device=device)
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, prompt_len): the prefill
    with torch.inference_mode():
        for _ in range(n_new):
            logits, cache = forward(weights, params, tokens, cache)  # (1, S, V)
            next_id = sample_next_token(logits[:, -1], sampling, generator)  # (1,)
            token = int(next_id.item())
            if token in stop_ids:
                return
            yield token
            tokens = next_id.view(1, 1)  # (1, 1): from now on one token per step
