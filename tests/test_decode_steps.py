"""The compiled rest of a decode step (RMSNorm, RoPE, attention over the cache; several products in one call)
against model.py's own functions, which are the reference; fast_forward.py links the compiled pieces in front of
them for the decode loop.

Bounds, from what each compiled piece does differently (compiled.py, decode_kernels.c):
- rms_norm: only the order of the float32 sum of squares, so the inverse root moves by a few float32 ulps; each
  of the two bf16 roundings after it can then land one bf16 step (2^-8 relative) the other way: within 2^-7;
- apply_rope: PyTorch's complex product term by term, the same roundings: equal;
- attend: float32 sums in another order and another float32 exp; scores, probabilities and output are rounded
  to bf16 as the model rounds them, so a score can land one bf16 step the other way. A probability then moves by
  at most 2^-7 of itself; the output by at most 2^-7 of sum_t p_t |v_t| beside its own rounding (2^-8):
  within 2^-6 of the largest |v| at most. A wrong head grouping, position or mask is off by the size of v.
The kernels are built by conftest.py's `built` fixture (they skip where they cannot be).
"""

import pytest
import torch

from llama3_raw import compiled, fast_forward, kernels, model
from llama3_raw.quantize import quantize_int4, quantize_int8

bf16 = torch.bfloat16


def test_rms_norm_matches_the_model(kernels_on):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 1, 2048, generator=generator) * torch.logspace(-2, 2, 2048)).to(bf16)  # 3 rows: a batch
    weight = torch.randn(2048, generator=generator).to(bf16)
    fast, reference = compiled.rms_norm(x, weight, 1e-5), model.rms_norm(x, weight, 1e-5)
    assert fast is not None and fast.shape == reference.shape
    assert ((fast.float() - reference.float()).abs() <= 2 ** -7 * reference.float().abs()).all()
    assert (fast == reference).float().mean() >= 0.99
    assert torch.equal(model.rms_norm(x, weight, 1e-5), fast)  # what the model runs while decoding


@pytest.mark.parametrize("batch, per_row", [(1, False), (3, False), (3, True)])  # per row: left-padded prompts
def test_rope_matches_the_model_exactly(kernels_on, batch, per_row):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 8, 64, generator=generator).to(bf16)
    angles = torch.randn(batch, 1, 32, generator=generator) * 100 if per_row else torch.randn(1, 32, generator=generator) * 100
    rotations = torch.polar(torch.ones_like(angles), angles)
    fast = compiled.apply_rope(x, rotations)
    assert fast is not None and torch.equal(fast, model.apply_rope(x, rotations))


def cache_views(generator, batch, positions, kv_heads, head_dim):
    """Keys and values as the model passes them: the first rows and positions of larger cache buffers."""
    keys = torch.randn(batch + 1, positions + 5, kv_heads, head_dim, generator=generator).to(bf16)
    values = torch.randn(batch + 1, positions + 5, kv_heads, head_dim, generator=generator).to(bf16)
    return keys[:batch, :positions], values[:batch, :positions]


@pytest.mark.parametrize("batch, heads, kv_heads, positions, head_dim, masked", [
    (1, 8, 2, 11, 64, False),  # grouped-query
    (3, 4, 4, 37, 128, True),  # one query head per kv head, padded rows
    (2, 6, 1, 300, 16, False),  # one kv head for all
    (1, 32, 8, 300, 64, False),  # the 1B shape, long enough that the heads are shared among threads
])
def test_attention_matches_the_model(kernels_on, batch, heads, kv_heads, positions, head_dim, masked):
    generator = torch.Generator().manual_seed(positions)
    q = (torch.randn(batch, 1, heads, head_dim, generator=generator) * 2).to(bf16)
    keys, values = cache_views(generator, batch, positions, kv_heads, head_dim)
    mask = None
    if masked:  # row b's first 5 b positions are padding
        hidden = torch.arange(positions)[None, :] < 5 * torch.arange(batch)[:, None]
        mask = torch.zeros(batch, 1, 1, positions).masked_fill(hidden[:, None, None], float("-inf")).to(bf16)
    fast = compiled.attend(q, keys, values, mask)
    reference = model.attend(q, keys, values, mask)
    assert fast is not None and fast.shape == reference.shape == (batch, 1, heads * head_dim)
    assert (fast.float() - reference.float()).abs().max() <= 2 ** -6 * values.float().abs().max()
    assert (fast == reference).float().mean() >= 0.9


def test_the_step_kernels_leave_what_they_do_not_take_to_the_model(kernels_on):
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 8, 64, generator=generator).to(bf16)
    keys, values = cache_views(generator, 1, 9, 2, 64)
    record = {}
    assert compiled.attend(q, keys, values, None, record, "a") is None  # intermediates asked for: the model's own
    model.attend(q, keys, values, None, record, "a")
    assert record["a.weights"].shape == (1, 8, 1, 9)
    assert compiled.attend(q.repeat(1, 2, 1, 1), keys, values, None) is None  # two new positions: a prompt
    assert compiled.attend(q.float(), keys.float(), values.float(), None) is None  # float32
    assert compiled.attend(q[..., :8], keys[..., :8], values[..., :8], None) is None  # head_dim 8: not whole vectors
    x, weight = torch.randn(1, 1, 64).to(bf16), torch.ones(64, dtype=bf16, requires_grad=True)
    assert compiled.rms_norm(x, weight, 1e-5) is None  # training: the compiled pieces have no backward
    assert compiled.rms_norm(torch.randn(40, 64).to(bf16), weight.detach(), 1e-5) is None  # 40 rows: a prompt
    assert compiled.apply_rope(q, torch.ones(2, 32, dtype=torch.complex64)) is None  # rotations for two positions
    assert compiled.apply_rope(q[0], torch.ones(1, 32, dtype=torch.complex64)) is None  # not (B, S, heads, Dh)


def test_switched_off_the_model_runs_its_own_code(kernels_on, monkeypatch):
    calls = []
    monkeypatch.setattr(compiled.built, "rms_norm", lambda *args: calls.append(args), raising=False)
    x, weight = torch.randn(1, 1, 64).to(bf16), torch.ones(64, dtype=bf16)
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
    assert torch.equal(fast_forward.FAST["rms_norm"](x, weight, 1e-5), model.rms_norm(x, weight, 1e-5))
    assert not calls


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_products_in_one_call_are_each_product(kernels_on, threads):
    """q, k and v (or w1 and w3) by one call: every row of every matrix computed, by whichever thread, as alone."""
    generator = torch.Generator().manual_seed(threads)
    mats = [torch.randn(rows, 256, generator=generator) for rows in (64, 16, 16)]  # q, k, v of 4 heads on 1 kv head
    x = torch.randn(1, 1, 256, generator=generator).to(bf16)
    for weights in ([m.to(bf16) for m in mats], [quantize_int8(m) for m in mats],
                    [quantize_int4(m, 32).to("cpu") for m in mats]):
        torch.set_num_threads(threads)
        try:
            together = kernels.matmuls(x, *weights)
            alone = [kernels.matmul(x, w) for w in weights]
        finally:
            torch.set_num_threads(2)
        assert [t.shape for t in together] == [(1, 1, 64), (1, 1, 16), (1, 1, 16)]
        assert all(torch.equal(t, a) for t, a in zip(together, alone))


def test_products_of_mixed_kinds_go_one_by_one(kernels_on):
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(32, 128, generator=generator)
    x = torch.randn(1, 1, 128, generator=generator).to(bf16)
    together = kernels.matmuls(x, w.to(bf16), quantize_int8(w))
    assert torch.equal(together[0], kernels.matmul(x, w.to(bf16))) and torch.equal(together[1], kernels.matmul(x, quantize_int8(w)))


def test_a_padded_batch_decodes_alike_with_and_without(kernels_on, monkeypatch):
    """The model end to end on rows of different lengths (per-row rotations, the padding mask in the attention kernel),
    head_dim 16 so that every compiled piece runs: the next-token logits agree with the model's own code."""
    from helpers import random_state_dict

    from llama3_raw.params import params_from_dict
    raw = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, norm_eps=1e-5,
               rope_theta=500000.0)
    params, weights = params_from_dict(raw), random_state_dict(raw, seed=11)
    positions = torch.arange(9) - torch.tensor([[0], [3], [5]])  # (3, 9): rows padded by 0, 3 and 5 slots
    tokens = torch.randint(1, 512, (3, 9), generator=torch.Generator().manual_seed(12))

    def next_logits():
        cache = model.new_kv_cache(params, 3, 10, bf16)
        _, cache = fast_forward.forward(weights, params, tokens, cache, positions=positions)
        return fast_forward.forward(weights, params, tokens[:, -1:], cache, positions=positions[:, -1:] + 1)[0][:, -1].float()

    with_kernels = next_logits()
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
    without = next_logits()
    assert (with_kernels - without).abs().max() <= 0.02 * without.abs().max()


def test_without_the_compiled_module_the_model_runs_its_own_code(monkeypatch, gqa_checkpoint):
    """A machine where pip could not build the kernels (no C compiler): every compiled piece says no, nothing fails."""
    from llama3_raw import load_checkpoint
    monkeypatch.setattr(compiled, "built", None)
    assert not compiled.usable()
    ckpt = load_checkpoint(gqa_checkpoint[0], show_progress=False)
    cache = model.new_kv_cache(ckpt.params, 1, 4, bf16)
    _, cache = fast_forward.forward(ckpt.weights, ckpt.params, torch.tensor([[5, 6, 7]]), cache)
    logits, _ = fast_forward.forward(ckpt.weights, ckpt.params, torch.tensor([[8]]), cache)  # one row: decoding
    assert logits.isfinite().all()
    x = torch.randn(1, 1, 64).to(bf16)
    assert compiled.bf16_products(x, [torch.randn(8, 64).to(bf16)]) is None
    assert compiled.rms_norm(x, torch.ones(64, dtype=bf16), 1e-5) is None
