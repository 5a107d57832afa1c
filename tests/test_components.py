"""Each piece of the forward pass against the math it implements, written out independently here."""

import math

import pytest
import torch

from llama3_raw.model import apply_rope, attention, causal_mask, rms_norm, rope_rotations
from llama3_raw.params import ModelParams, params_from_dict


def tiny_params(**over):
    base = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=8,
                ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000.0)
    return params_from_dict(base | over)


def layer_weights(wq, wk, wv, wo) -> dict[str, torch.Tensor]:
    """Layer 0's attention matrices under Meta's key names, as attention() reads them."""
    return {f"layers.0.attention.{name}.weight": w for name, w in zip(("wq", "wk", "wv", "wo"), (wq, wk, wv, wo))}


def test_rms_norm_formula():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    w = torch.rand(16, dtype=torch.float64) + 0.5
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected)


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_keeps_norms_and_depends_only_on_relative_position(scaled):
    params = tiny_params(use_scaled_rope=scaled, rope_theta=500000.0)
    q = torch.randn(1, 1, 1, params.head_dim)
    k = torch.randn(1, 1, 1, params.head_dim)

    def rotated(x, pos):
        return apply_rope(x, rope_rotations(params, torch.tensor([pos])))

    assert torch.allclose(rotated(q, 37).norm(), q.norm(), atol=1e-5)
    dot = lambda m, n: float((rotated(q, m) * rotated(k, n)).sum())  # noqa: E731
    assert math.isclose(dot(10, 3), dot(107, 100), abs_tol=1e-4)
    assert math.isclose(dot(5, 5), float((q * k).sum()), abs_tol=1e-4)
    assert not math.isclose(dot(10, 3), dot(10, 4), abs_tol=1e-3)


def test_rope_rotates_interleaved_pairs():
    """Meta's convention: pair (x[2j], x[2j+1]) turns by position * theta^(-2j/head_dim)."""
    params = tiny_params()
    x = torch.randn(1, 1, 1, params.head_dim)
    pos = 7
    out = apply_rope(x, rope_rotations(params, torch.tensor([pos])))[0, 0, 0]
    for j in range(params.head_dim // 2):
        angle = pos * params.rope_theta ** (-2 * j / params.head_dim)
        a, b = x[0, 0, 0, 2 * j], x[0, 0, 0, 2 * j + 1]
        assert math.isclose(out[2 * j], a * math.cos(angle) - b * math.sin(angle), abs_tol=1e-5)
        assert math.isclose(out[2 * j + 1], a * math.sin(angle) + b * math.cos(angle), abs_tol=1e-5)


def test_causal_mask():
    mask = causal_mask(torch.arange(4), 0, torch.float32)
    assert torch.equal(torch.isinf(mask), torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    with_cache = causal_mask(torch.arange(5, 8), 5, torch.float32)  # 3 new tokens at positions 5, 6, 7
    assert with_cache.shape == (3, 8)
    assert torch.isinf(with_cache[0, 6:]).all() and (with_cache[0, :6] == 0).all()
    assert (with_cache[2] == 0).all()
    assert causal_mask(torch.tensor([9]), 9, torch.float32) is None


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = tiny_params(n_heads=4, n_kv_heads=2)
    mha = tiny_params(n_heads=4, n_kv_heads=4)
    dim, hd = gqa.dim, gqa.head_dim
    x = torch.randn(2, 6, dim)
    wq, wo = torch.randn(dim, dim) / 6, torch.randn(dim, dim) / 6
    wk, wv = torch.randn(2 * hd, dim) / 6, torch.randn(2 * hd, dim) / 6
    # In MHA form, query head h gets kv head h // 2: repeat each kv head's rows twice.
    wk_full = wk.view(2, hd, dim).repeat_interleave(2, dim=0).reshape(4 * hd, dim)
    wv_full = wv.view(2, hd, dim).repeat_interleave(2, dim=0).reshape(4 * hd, dim)
    rot = rope_rotations(gqa, torch.arange(6))
    mask = causal_mask(torch.arange(6), 0, torch.float32)
    out_gqa = attention(x, layer_weights(wq, wk, wv, wo), 0, rot, mask, None)
    out_mha = attention(x, layer_weights(wq, wk_full, wv_full, wo), 0, rot, mask, None)
    torch.testing.assert_close(out_gqa, out_mha)


def test_attention_is_causal():
    params = tiny_params()
    x = torch.randn(1, 6, params.dim)
    w = [torch.randn(s) / 6 for s in [(32, 32), (16, 32), (16, 32), (32, 32)]]
    rot, mask = rope_rotations(params, torch.arange(6)), causal_mask(torch.arange(6), 0, torch.float32)
    record = {}
    out = attention(x, layer_weights(*w), 0, rot, mask, None, record)
    x_changed = x.clone()
    x_changed[0, 4:] += 1.0  # later tokens must not change earlier outputs
    out_changed = attention(x_changed, layer_weights(*w), 0, rot, mask, None)
    torch.testing.assert_close(out[0, :4], out_changed[0, :4])
    weights = record["layers.0.attention.weights"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 6))
    assert (weights.triu(diagonal=1) == 0).all()


@pytest.mark.parametrize("dim,multiple_of,multiplier,hidden", [
    (4096, 1024, 1.3, 14336),   # Llama 3 8B: w1 is (14336, 4096) in Meta's checkpoint
    (8192, 4096, 1.3, 28672),   # Llama 3 70B
    (2048, 256, 1.5, 8192),     # Llama 3.2 1B
    (3072, 256, 1.0, 8192),     # Llama 3.2 3B
])
def test_ffn_hidden_dim_matches_meta_checkpoints(dim, multiple_of, multiplier, hidden):
    params = ModelParams(dim=dim, n_layers=1, n_heads=dim // 128, n_kv_heads=8, vocab_size=128256,
                         multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=1e-5, rope_theta=500000.0)
    assert params.ffn_hidden_dim == hidden


@pytest.mark.parametrize("bad", [dict(dim=30), dict(n_kv_heads=3), dict(n_heads=0), dict(norm_eps="x"),
                                 dict(ffn_dim_multiplier=-1.0)])
def test_params_that_do_not_fit_are_rejected(bad):
    with pytest.raises(ValueError):
        tiny_params(**bad)
