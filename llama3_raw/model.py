"""Llama 3's forward pass: small pure functions over tensors, composed in `forward`.

Weights are a flat dict with Meta's key names; the KV cache is explicit data passed in and out;
nothing is hidden in objects. Shapes use B = batch, S = new tokens, T = all positions seen so far
(cache + new), D = dim, H = query heads, K = key/value heads, Dh = head_dim, V = vocab.

The arithmetic follows Meta's reference (llama_models/llama3/model.py) step for step, including
where it goes to float32 (RMSNorm statistics, RoPE, softmax), so fp32 and bf16 runs match it.

Everything here is the plain arithmetic, and it is what runs when you step through it in a debugger. For speed,
the decode loop runs these same functions linked to faster kernels for their products, RMSNorm, RoPE and
attention (fast_forward.py) -- the same code objects, the same arithmetic, other code doing the sums.
"""

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .kernels import Weight, quantized_matmul
from .parallel import SINGLE_PROCESS, Ranks
from .params import ModelParams

Tensor = torch.Tensor
Weights = dict[str, Weight]  # Meta's key names -> tensors (or int8 matrices, see quantize.py)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of every position seen so far, one preallocated buffer per layer. `forward` writes new
    positions into the buffers in place and returns a cache (sharing them) whose `length` counts them."""

    keys: tuple[Tensor, ...]  # per layer: (B, capacity, K, Dh)
    values: tuple[Tensor, ...]  # per layer: (B, capacity, K, Dh)
    length: int = 0  # positions 0..length-1 are filled

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


def new_kv_cache(params: ModelParams, batch_size: int, capacity: int, dtype: torch.dtype, device="cpu",
                 ranks: Ranks = SINGLE_PROCESS) -> KVCache:
    """Zeroed buffers for `capacity` positions; under tensor parallelism, for this rank's kv heads only."""
    _, n_kv_heads = ranks.local_heads(params)
    shape = (batch_size, capacity, n_kv_heads, params.head_dim)
    keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(params.n_layers))
    values = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(params.n_layers))
    return KVCache(keys, values, 0)


def matmul(x: Tensor, w: Weight) -> Tensor:
    """x @ w.T: (..., in) -> (..., out), w (out, in) as Meta stores it; int8/int4 weights (quantize.py) too."""
    return x @ w.T if isinstance(w, Tensor) else quantized_matmul(x, w)


def matmuls(x: Tensor, *ws: Weight) -> tuple[Tensor, ...]:
    """(x @ w.T for w in ws): one input, several weights (the decode step's kernels multiply them in one call)."""
    # matmul's line written out, not called, so that one step into here shows the product itself
    return tuple(x @ w.T if isinstance(w, Tensor) else quantized_matmul(x, w) for w in ws)


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for every (batch, head): attention's products, named so the decode step can link a faster one."""
    return a @ b


def at_least_fp32(x: Tensor) -> Tensor:
    """Meta's `.float()`: bf16/fp16 go up to float32; float64 (gradient checks) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, with the statistics taken in float32 whatever x's dtype."""
    x32 = at_least_fp32(x)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def scale_rope_frequencies(freqs: Tensor, params: ModelParams) -> Tensor:
    """Llama 3.1's long-context fix: slow down low frequencies, keep high ones, blend in between. The
    constants are Meta's (factor 8, 1, 4, 8192) unless a Hugging Face config.json said otherwise."""
    scale, low, high = params.rope_scaling_factor, params.rope_low_freq_factor, params.rope_high_freq_factor
    original_context = params.rope_original_context
    low_freq_wavelen = original_context / low
    high_freq_wavelen = original_context / high
    wavelen = 2 * torch.pi / freqs
    slowed = torch.where(wavelen > low_freq_wavelen, freqs / scale, freqs)
    smooth = (original_context / wavelen - low) / (high - low)
    in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_between, (1 - smooth) * slowed / scale + smooth * slowed, slowed)


@functools.lru_cache(maxsize=8)
def rope_frequencies(params: ModelParams) -> Tensor:
    """Each pair's rotation speed in radians per position (Dh/2,): fixed per model, so computed once."""
    head_dim = params.head_dim
    freqs = 1.0 / (params.rope_theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return scale_rope_frequencies(freqs, params) if params.use_scaled_rope else freqs


def rope_rotations(params: ModelParams, positions: Tensor, device="cpu") -> Tensor:
    """Unit complex numbers e^(i * position * freq) for each token's position (S,) -> (S, Dh/2), or (B, S) ->
    (B, S, Dh/2), computed on the CPU in float32 exactly as Meta's `precompute_freqs_cis`, then moved."""
    freqs = rope_frequencies(params)  # (Dh/2,)
    angles = positions.cpu().float()[..., None] * freqs  # (S, Dh/2): torch.outer, row by row when (B, S)
    return torch.polar(torch.ones_like(angles), angles).to(device)  # complex64


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate each interleaved pair (x[2j], x[2j+1]) of every head by its position's angle for frequency j."""
    pairs = torch.view_as_complex(at_least_fp32(x).reshape(*x.shape[:-1], -1, 2))  # (B, S, heads, Dh/2) complex
    if rotations.dim() == 2:
        rotations = rotations[None]  # (1, S, Dh/2): the same positions for every row
    rotated = pairs * rotations[:, :, None, :]  # broadcast over heads (and over batch when every row shares them)
    return torch.view_as_real(rotated).flatten(3).type_as(x)  # (B, S, heads, Dh)


def causal_mask(positions: Tensor, start: int, dtype: torch.dtype, device="cpu") -> Tensor | None:
    """Additive mask, 0 where a new token may see a key and -inf where not: (S, T) for `positions` (S,), or
    (B, 1, S, T) -- the same for every head -- for (B, S). The keys are the T = start + S slots of the cache
    and the new tokens, and a row's slots hold its consecutive positions. A token sees the keys at its own
    position and before. Pad slots (negative positions: rows left-padded to a common length) are hidden from
    real tokens; they see earlier pads, so that their scores stay finite (all -inf would give NaN)."""
    if positions.dim() == 1 and len(positions) == 1:
        return None  # a single new token, in rows all at the same positions: it may see everything before it
    positions = positions.cpu()  # a little integer work, done on the CPU like the rotations'; the mask then moves
    first = positions[..., :1]  # (1,) or (B, 1): the position of each row's first new token, in slot `start`
    key_positions = torch.arange(start + positions.shape[-1]) + (first - start)  # (T,) or (B, T)
    queries, keys = positions[..., :, None], key_positions[..., None, :]  # (.., S, 1), (.., 1, T)
    visible = (keys <= queries) & ((keys >= 0) | (queries < 0))  # (S, T) or (B, S, T)
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    return (mask if positions.dim() == 1 else mask[:, None]).to(device=device, dtype=dtype)


def attention(
    x: Tensor, weights: Weights, layer: int, rotations: Tensor, mask: Tensor | None, cache: KVCache | None,
    record: dict | None = None, ranks: Ranks = SINGLE_PROCESS,
) -> Tensor:
    """Grouped-query self-attention of x (B, S, D) -> (B, S, D): project to query, key and value heads, rotate
    q and k by their positions, append k and v to the layer's cache, let every query head attend, project back."""
    name = f"layers.{layer}.attention"
    wq = weights[f"{name}.wq.weight"]  # (H * Dh, D)
    wk = weights[f"{name}.wk.weight"]  # (K * Dh, D)
    wv = weights[f"{name}.wv.weight"]  # (K * Dh, D)
    wo = weights[f"{name}.wo.weight"]  # (D, H * Dh)
    batch, seq_len, _ = x.shape
    head_dim = 2 * rotations.shape[-1]  # RoPE turns pairs of a head's dimensions
    n_heads, n_kv_heads = wq.shape[0] // head_dim, wk.shape[0] // head_dim  # all, or this rank's share
    q, k, v = matmuls(x, wq, wk, wv)  # x @ wq.T, x @ wk.T, x @ wv.T
    q = q.view(batch, seq_len, n_heads, head_dim)  # (B, S, H, Dh)
    k = k.view(batch, seq_len, n_kv_heads, head_dim)  # (B, S, K, Dh)
    v = v.view(batch, seq_len, n_kv_heads, head_dim)  # (B, S, K, Dh)
    q, k = apply_rope(q, rotations), apply_rope(k, rotations)
    keep(record, f"{name}.q", q)
    keep(record, f"{name}.k", k)
    keep(record, f"{name}.v", v)

    if cache is not None:  # the new keys and values go after the `cache.length` slots already filled
        cache_k, cache_v, start = cache.keys[layer], cache.values[layer], cache.length
        cache_k[:batch, start:start + seq_len] = k
        cache_v[:batch, start:start + seq_len] = v
        k = cache_k[:batch, :start + seq_len]  # (B, T, K, Dh): a view of the cache, not a copy
        v = cache_v[:batch, :start + seq_len]

    mixed = attend(q, k, v, mask, record, name)  # (B, S, H * Dh)
    out = matmul(mixed, wo)  # (B, S, H * Dh) -> (B, S, D)
    return ranks.all_reduce(out)  # tensor parallel: each rank's heads give a partial sum of the output


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, record: dict | None = None,
           name: str = "attention") -> Tensor:
    """Each query head's mix of the values, weighted by softmax(q k^T / sqrt(Dh) + mask) over all T positions:
    q (B, S, H, Dh), k and v (B, T, K, Dh) -> (B, S, H * Dh), the heads side by side."""
    (batch, seq_len, n_heads, head_dim), n_kv_heads = q.shape, k.shape[2]
    # Grouped-query attention: the n = H / K query heads that share key/value head g (query heads
    # g*n .. g*n+n-1, Meta's repeat_kv order) are stacked as n*S rows against that one head's keys,
    # so the cached keys and values are read in place instead of being copied n times every step.
    n = n_heads // n_kv_heads  # Meta's n_rep
    q = q.view(batch, seq_len, n_kv_heads, n, head_dim)  # (B, S, K, n, Dh)
    q = q.permute(0, 2, 3, 1, 4).reshape(batch, n_kv_heads, n * seq_len, head_dim)  # (B, K, n*S, Dh)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, Dh)
    scores = batched_matmul(q, k.transpose(2, 3)) / math.sqrt(head_dim)  # (B, K, n*S, T)
    scores = scores.view(batch, n_kv_heads, n, seq_len, -1)  # (B, K, n, S, T)
    if mask is not None:  # (S, T), or (B, 1, S, T) for padded rows: one more axis for the group
        scores = scores + (mask if mask.dim() == 2 else mask[:, :, None])
    probs = F.softmax(at_least_fp32(scores), dim=-1).type_as(q)  # (B, K, n, S, T), rows sum to 1
    if record is not None:
        keep(record, f"{name}.weights", probs.reshape(batch, n_heads, seq_len, -1))  # (B, H, S, T)
    mixed = batched_matmul(probs.view(batch, n_kv_heads, n * seq_len, -1), v)  # (B, K, n*S, Dh)
    mixed = mixed.view(batch, n_kv_heads, n, seq_len, head_dim).permute(0, 3, 1, 2, 4)  # (B, S, K, n, Dh)
    return mixed.reshape(batch, seq_len, n_heads * head_dim)


def feed_forward(x: Tensor, weights: Weights, layer: int, ranks: Ranks = SINGLE_PROCESS) -> Tensor:
    """SwiGLU: silu(x W1) gates x W3, then W2 projects back to dim."""
    p = f"layers.{layer}.feed_forward."
    gate, up = matmuls(x, weights[p + "w1.weight"], weights[p + "w3.weight"])  # (B, S, hidden) each
    out = matmul(F.silu(gate) * up, weights[p + "w2.weight"])  # (B, S, hidden) -> (B, S, D)
    return ranks.all_reduce(out)  # tensor parallel: each rank's slice of the hidden units gives a partial sum


def transformer_block(
    x: Tensor, weights: Weights, layer: int, params: ModelParams, rotations: Tensor, mask: Tensor | None,
    cache: KVCache | None, record: dict | None = None, ranks: Ranks = SINGLE_PROCESS,
) -> Tensor:
    """One layer, (B, S, D) -> (B, S, D): x + attention(rms_norm(x)), then h + feed_forward(rms_norm(h))."""
    p = f"layers.{layer}."
    attention_in = rms_norm(x, weights[p + "attention_norm.weight"], params.norm_eps)
    keep(record, p + "attention_norm", attention_in)
    attention_out = attention(attention_in, weights, layer, rotations, mask, cache, record, ranks)
    keep(record, p + "attention", attention_out)
    h = x + regularized(attention_out)  # residual stream after attention
    keep(record, p + "attention_residual", h)
    ffn_in = rms_norm(h, weights[p + "ffn_norm.weight"], params.norm_eps)
    keep(record, p + "ffn_norm", ffn_in)
    ffn_out = feed_forward(ffn_in, weights, layer, ranks)
    keep(record, p + "feed_forward", ffn_out)
    out = h + regularized(ffn_out)  # residual stream after the block
    keep(record, p + "output", out)
    return out


def forward(
    weights: Weights, params: ModelParams, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
    record: dict | None = None, last_only: bool = False, ranks: Ranks = SINGLE_PROCESS,
) -> tuple[Tensor, KVCache | None]:
    """Logits (B, S, V) in float32 (float64 for float64 weights) for token ids (B, S) that follow the cache's positions.

    Without a cache the tokens are positions 0..S-1 (a whole prompt, or a training window). With one, they
    continue at `cache.length`, their keys and values are written into it, and the returned cache counts them.
    `positions` (B, S): each token's own position instead, for rows left-padded to a common length (a row's
    first real token is position 0, its pad slots negative and hidden); pass them in this and every later call.
    `record={}` gets every intermediate by name, in forward order: `tok_embeddings`, then per layer i
    `layers.{i}.attention_norm`, `.attention.q/.k/.v` (after RoPE), `.attention.weights` (B, H, S, T),
    `.attention`, `.attention_residual`, `.ffn_norm`, `.feed_forward`, `.output`; then `norm` and `logits`.
    `last_only=True`: the last position's logits only (B, 1, V), all generation needs. `ranks`: the slice of
    every weight this process holds under tensor parallelism (parallel.py); the default holds them whole.
    """
    seq_len = tokens.shape[1]  # tokens (B, S)
    start = 0 if cache is None else cache.length  # cache slots already filled
    if cache is not None and start + seq_len > cache.capacity:
        raise ValueError(f"{start} cached + {seq_len} new positions exceed the cache's capacity {cache.capacity}")
    if positions is None:
        positions = torch.arange(start, start + seq_len)  # (S,): the same in every row
    h = regularized(embed(weights["tok_embeddings.weight"], tokens, ranks))  # (B, S, D)
    keep(record, "tok_embeddings", h)
    rotations = rope_rotations(params, positions, h.device)  # (S, Dh/2), or (B, S, Dh/2)
    mask = causal_mask(positions, start, h.dtype, h.device)  # (S, T), (B, 1, S, T), or None
    for layer in range(params.n_layers):
        h = transformer_block(h, weights, layer, params, rotations, mask, cache, record, ranks)
    if last_only:
        h = h[:, -1:]  # (B, 1, D)
    h = rms_norm(h, weights["norm.weight"], params.norm_eps)
    keep(record, "norm", h)
    logits = at_least_fp32(ranks.all_gather(matmul(h, weights["output.weight"])))  # (B, S, V), or (B, 1, V)
    keep(record, "logits", logits)
    new_cache = None if cache is None else replace(cache, length=start + seq_len)
    return logits, new_cache


def embed(table: Tensor, tokens: Tensor, ranks: Ranks = SINGLE_PROCESS) -> Tensor:
    """Each token id's row of the embedding table: (B, S) -> (B, S, D). Under tensor parallelism each rank
    holds a slice of the vocabulary's rows, and the ranks add up their lookups (parallel.py)."""
    return table[tokens] if ranks.world_size == 1 else ranks.embedding_rows(table, tokens)


def regularized(x: Tensor) -> Tensor:
    """Where training regularizes: the embeddings, and what each attention and feed-forward adds. Here, as in
    Meta's model, x itself; training links its dropout to this name (training/dropout.py)."""
    return x


def keep(record: dict | None, name: str, tensor: Tensor) -> None:
    """Store a named intermediate when the caller asked for them (`record` is a dict)."""
    if record is not None:
        record[name] = tensor.detach()
