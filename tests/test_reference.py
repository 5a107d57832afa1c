"""This project's forward pass against Meta's reference Transformer (llama_models), on random checkpoints.

Tolerances: in float32 both sides do the same operations in the same order, so we allow 1e-5
absolute on block outputs and logits (values are O(1)-O(10)); in bfloat16 we compare to the
reference run in bfloat16 too and allow 2e-2 relative to the largest value.
"""

import pytest
import torch

from helpers import FORTY_TWO_PROMPT, OFFICIAL_TOKENIZER, meta_layer_outputs, meta_transformer
from llama3_raw import cast_weights, forward, generate, load_checkpoint, load_tokenizer, new_kv_cache

FP32_ATOL = 1e-5


def prompt_ids(text=FORTY_TWO_PROMPT):
    return load_tokenizer(OFFICIAL_TOKENIZER).encode(text, bos=True)


def long_prompt_ids(n_tokens: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [128000] + torch.randint(0, 128000, (n_tokens - 1,), generator=gen).tolist()


@pytest.fixture(params=["gqa_checkpoint", "mqa_checkpoint", "scaled_tied_checkpoint"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def ours(ckpt_dir, dtype=torch.float32):
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    return cast_weights(ckpt.weights, dtype, "cpu"), ckpt.params


def test_every_block_and_logits_match_meta_fp32(checkpoint):
    ckpt_dir, p, state = checkpoint
    weights, params = ours(ckpt_dir)
    tokens = torch.tensor([prompt_ids()])
    record = {}
    logits, _ = forward(weights, params, tokens, record=record)
    ref_blocks, ref_logits = meta_layer_outputs(meta_transformer(p, state), tokens)
    assert len(ref_blocks) == params.n_layers
    for i, ref_block in enumerate(ref_blocks):
        torch.testing.assert_close(record[f"layers.{i}.output"], ref_block, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=FP32_ATOL, rtol=0)
    assert ref_logits.abs().max() > 1.0  # not a degenerate all-zero comparison


def test_long_prompt_with_scaled_rope_matches_meta(scaled_tied_checkpoint):
    """A few hundred positions, so the RoPE scaling and long-range rotations are exercised."""
    ckpt_dir, p, state = scaled_tied_checkpoint
    weights, params = ours(ckpt_dir)
    tokens = torch.tensor([long_prompt_ids(300)])
    logits, _ = forward(weights, params, tokens)
    _, ref_logits = meta_layer_outputs(meta_transformer(p, state, max_seq_len=512), tokens)
    torch.testing.assert_close(logits, ref_logits, atol=FP32_ATOL, rtol=0)


def test_bf16_matches_meta_bf16(gqa_checkpoint):
    ckpt_dir, p, state = gqa_checkpoint
    weights, params = ours(ckpt_dir, torch.bfloat16)
    tokens = torch.tensor([prompt_ids()])
    logits, _ = forward(weights, params, tokens)
    _, ref_logits = meta_layer_outputs(meta_transformer(p, state, dtype=torch.bfloat16), tokens)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 2e-2 * scale


def meta_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding with Meta's own KV cache: prefill, then one token at a time at start_pos."""
    out = []
    logits = model.forward(torch.tensor([ids]), 0)
    pos = len(ids)
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = model.forward(torch.tensor([[token]]), pos)
        pos += 1
    return out


def test_greedy_generation_matches_meta_for_24_steps(checkpoint):
    ckpt_dir, p, state = checkpoint
    weights, params = ours(ckpt_dir)
    ids = prompt_ids()
    ours_tokens = list(generate(weights, params, ids, max_new_tokens=24, stop_ids=()))
    assert ours_tokens == meta_greedy(meta_transformer(p, state), ids, 24)


def test_kv_cache_decode_equals_full_reforward(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    weights, params = ours(ckpt_dir)
    sequence = torch.tensor([long_prompt_ids(40, seed=5)])
    full_logits, _ = forward(weights, params, sequence)
    cache = new_kv_cache(params, batch_size=1, capacity=40, dtype=torch.float32)
    step_logits, cache = forward(weights, params, sequence[:, :25], cache)  # prefill 25, then chunks of 1 and 4
    pieces = [step_logits]
    for chunk in [sequence[:, 25:26], sequence[:, 26:30], *sequence[:, 30:].split(1, dim=1)]:
        logits, cache = forward(weights, params, chunk, cache)
        pieces.append(logits)
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full_logits, atol=1e-4, rtol=1e-4)


def test_batch_rows_are_independent(mqa_checkpoint):
    ckpt_dir, _, _ = mqa_checkpoint
    weights, params = ours(ckpt_dir)
    a, b = long_prompt_ids(12, seed=1), long_prompt_ids(12, seed=2)
    both, _ = forward(weights, params, torch.tensor([a, b]))
    alone, _ = forward(weights, params, torch.tensor([b]))
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)
