"""Batched prompts of different lengths: each row gets exactly the tokens it gets alone.

Oracle: `generate` on each prompt alone (itself checked against Meta's reference in test_reference.py),
greedy, float32; and the unpadded forward pass for the logits of each left-padded row.
"""

import importlib

import pytest
import torch

from helpers import fp32_model, spy_on_forward
from llama3_raw import forward, generate
from llama3_raw.generate import generate_batch

generation = importlib.import_module("llama3_raw.generate")  # the module (the package exports a function of that name)
# Batching changes how float32 matmuls are blocked, so rows differ from the single run in the last bits.
BATCH_ATOL = 1e-4

TEXTS = ["Hi", "the answer to the ultimate question of life, the universe, and everything is ",
         "Once upon a time, in a land far away", "x = 1\ny ="]


@pytest.fixture(params=["gqa_checkpoint", "scaled_tied_checkpoint"])
def model(request):
    ckpt_dir, _, _ = request.getfixturevalue(request.param)
    return fp32_model(ckpt_dir)


def test_padded_rows_have_the_logits_of_each_prompt_alone(model):
    weights, params, tokenizer = model
    prompts = [tokenizer.encode(text) for text in TEXTS]
    longest = max(map(len, prompts))
    tokens = torch.tensor([[0] * (longest - len(ids)) + ids for ids in prompts])
    padding = torch.tensor([longest - len(ids) for ids in prompts])
    positions = torch.arange(longest) - padding[:, None]  # (B, longest): each prompt's own, its pads negative
    batched, _ = forward(weights, params, tokens, positions=positions)  # (B, longest, V)
    for row, ids in enumerate(prompts):
        alone, _ = forward(weights, params, torch.tensor([ids]))
        torch.testing.assert_close(batched[row, longest - len(ids):], alone[0], atol=BATCH_ATOL, rtol=0)


def test_batch_gives_each_prompt_its_own_tokens_and_finished_rows_leave(model, monkeypatch):
    weights, params, tokenizer = model
    prompts = [tokenizer.encode(text) for text in TEXTS]
    alone = [list(generate(weights, params, ids, 12, tokenizer.stop_ids)) for ids in prompts]
    # Make some row stop before the others: one of the tokens it picks becomes a stop token (random weights
    # often repeat one token per row, so try tokens until one stops some rows but not all).
    for token in dict.fromkeys(t for row in alone for t in row):
        stop_ids = tokenizer.stop_ids + (token,)
        stopped = [list(generate(weights, params, ids, 12, stop_ids)) for ids in prompts]
        if min(map(len, stopped)) < max(map(len, stopped)):
            break
    alone = stopped
    assert min(map(len, alone)) < max(map(len, alone))

    shapes = spy_on_forward(monkeypatch, generation)
    batched = generate_batch(weights, params, prompts, 12, stop_ids)
    batch_sizes = [shape[0] for shape in shapes]
    assert batched == alone
    assert batch_sizes[0] == len(prompts) and batch_sizes[-1] < len(prompts)  # finished rows stopped early
    assert batch_sizes == sorted(batch_sizes, reverse=True) and len(batch_sizes) <= 12
