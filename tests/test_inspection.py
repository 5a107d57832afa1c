"""Issue 7's views: logit lens, attention maps, shapes trace, compare against Meta's reference, score."""

import json
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import fp32_model, python_m
from llama3_raw import forward
from llama3_raw.tools.compare import compare_with_reference, perturbed
from llama3_raw.tools.inspection import inspect_prompt, logit_lens
from llama3_raw.tools.score import score_text, sequence_nll, window_spans

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def model(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    return fp32_model(ckpt_dir)


def test_logit_lens_at_the_last_block_equals_the_logits(model):
    weights, params, tokenizer = model
    record = {}
    logits, _ = forward(weights, params, torch.tensor([tokenizer.encode(PROMPT)]), record=record)
    top_ids, top_probs = logit_lens(weights, params, record)
    assert top_ids.shape == (params.n_layers, logits.shape[1])
    probs = torch.softmax(logits[0], dim=-1)
    torch.testing.assert_close(top_probs[-1], probs.max(-1).values)
    assert torch.equal(top_ids[-1], logits[0].argmax(-1))
    assert not torch.equal(top_ids[0], top_ids[-1])  # earlier blocks do guess differently


def test_attention_rows_sum_to_one_and_are_zero_above_the_diagonal(model):
    weights, params, tokenizer = model
    record = {}
    forward(weights, params, torch.tensor([tokenizer.encode(PROMPT)]), record=record)
    for layer in range(params.n_layers):
        attn = record[f"layers.{layer}.attention.weights"]  # (1, H, S, S)
        assert attn.shape[1] == params.n_heads
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
        assert (attn.triu(diagonal=1) == 0).all()
        on_or_below = torch.ones(attn.shape[-2:], dtype=torch.bool).tril()
        assert (attn[..., on_or_below] > 0).all()


def assert_real_picture(path: Path, min_side: int = 200):
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_side and image.shape[1] >= min_side
    colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
    assert len(colours) > 50, f"{path} is nearly one colour"


def test_inspect_writes_every_view(model, tmp_path):
    weights, params, tokenizer = model
    summary = inspect_prompt(weights, params, tokenizer, PROMPT, tmp_path, layers=[0, 1])
    assert_real_picture(tmp_path / "logit_lens.png")
    assert_real_picture(tmp_path / "attention_layer_00.png")
    assert_real_picture(tmp_path / "attention_layer_01.png")
    trace = (tmp_path / "shapes.txt").read_text().splitlines()
    names = [line.split()[0] for line in trace]
    assert names[0] == "tok_embeddings" and names[-2:] == ["norm", "logits"]
    assert names.index("layers.0.attention_norm") < names.index("layers.0.attention.q") < names.index("layers.0.output")
    assert "(1, 11, 8, 8)" in (tmp_path / "shapes.txt").read_text()  # q: 11 tokens, 8 heads of 8
    table = (tmp_path / "logit_lens.md").read_text().splitlines()
    assert len(table) == 2 + params.n_layers
    assert len(summary["last_position_top_tokens"]) == params.n_layers


def test_compare_reports_zero_and_flags_a_perturbed_block_exactly(gqa_checkpoint, model):
    weights, params, tokenizer = model
    ids = tokenizer.encode(PROMPT)
    same = compare_with_reference(weights, weights, params, ids, tolerance=1e-4)
    assert same.ok and same.first_bad_block is None
    assert max(d.max_abs for d in same.blocks) < 1e-5 and same.top1_agreement == 1.0
    broken = compare_with_reference(perturbed(weights, "layers.1.attention.wk.weight"), weights, params, ids, 1e-4)
    assert not broken.ok
    assert broken.first_bad_block == 1
    assert broken.blocks[0].max_abs < 1e-5  # block 0 untouched


def test_score_equals_cross_entropy_of_the_forward_logits(model):
    weights, params, tokenizer = model
    text = "To be, or not to be, that is the question."
    ids = tokenizer.encode(text, bos=False)
    logits, _ = forward(weights, params, torch.tensor([[tokenizer.bos_id] + ids[:-1]]))
    expected_mean = F.cross_entropy(logits[0], torch.tensor(ids)).item()
    score = score_text(weights, params, tokenizer, text, window=64, stride=32)
    assert score.tokens == len(ids) and score.characters == len(text)
    assert score.nats_per_token == pytest.approx(expected_mean, rel=1e-5)
    assert score.perplexity == pytest.approx(np.exp(expected_mean), rel=1e-5)
    assert score.nats_per_char == pytest.approx(expected_mean * len(ids) / len(text), rel=1e-5)


def test_sliding_windows_score_each_token_once_with_enough_context(model):
    spans = window_spans(100, window=16, stride=5)
    scored = [i for _, start, end in spans for i in range(start, end)]
    assert scored == list(range(100))
    for context_start, start, end in spans:
        assert end - context_start <= 16
        assert context_start == 0 or start - context_start >= 16 - 5
    weights, params, tokenizer = model
    ids = tokenizer.encode("All the world's a stage, and all the men and women merely players. " * 3, bos=False)
    windowed = sequence_nll(weights, params, ids, tokenizer.bos_id, window=12, stride=4)
    # the tokens of the second window, scored by hand from one forward pass over its own slice
    (c0, s0, e0), (c1, s1, e1) = window_spans(len(ids), 12, 4)[:2]
    inputs = torch.tensor([[tokenizer.bos_id] + ids[c1:e1 - 1]])
    logits, _ = forward(weights, params, inputs)
    by_hand = F.cross_entropy(logits[0, s1 - c1:], torch.tensor(ids[s1:e1]), reduction="sum").item()
    first = F.cross_entropy(forward(weights, params, torch.tensor([[tokenizer.bos_id] + ids[:e0 - 1]]))[0][0],
                            torch.tensor(ids[:e0]), reduction="sum").item()
    assert len(window_spans(len(ids), 12, 4)) > 2
    assert windowed > first + by_hand  # more windows follow
    partial = sequence_nll(weights, params, ids[:e1], tokenizer.bos_id, window=12, stride=4)
    assert partial == pytest.approx(first + by_hand, rel=1e-5)


@pytest.fixture
def run_module(cli):
    """`python -m llama3_raw ARGS`, in this process (helpers.call)."""
    return lambda *args: cli(*args, entry=python_m, cwd=REPO)


def test_tools_from_the_command_line(gqa_checkpoint, tmp_path, run_module):
    ckpt_dir, _, _ = gqa_checkpoint
    result = run_module("inspect", "Hello there", "--ckpt-dir", ckpt_dir, "--out", tmp_path / "views", "--layers", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "views").iterdir()) == [
        "attention_layer_01.png", "logit_lens.md", "logit_lens.png", "shapes.txt"]

    result = run_module("compare", "--ckpt-dir", ckpt_dir, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["first_bad_block"] is None and report["top1_agreement"] == 1.0

    result = run_module("compare", "--ckpt-dir", ckpt_dir, "--perturb", "layers.1.attention.wk.weight")
    assert result.returncode == 1
    assert "first block over it: 1" in result.stdout and "MISMATCH" in result.stdout

    text = tmp_path / "text.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.")
    result = run_module("score", text, "--ckpt-dir", ckpt_dir, "--window", 16, "--stride", 8, "--json")
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["characters"] == len(text.read_text()) and scored["nats_per_char"] > 0


@pytest.mark.parametrize("args,fragment", [
    (["inspect", "--layers", "7"], "--layers"),
    (["compare", "--perturb", "layers.9.nothing"], "--perturb"),
    (["score", "missing.txt"], "missing.txt does not exist"),
    (["score", "EMPTY", "--window", "1"], "is empty"),
])
def test_tool_bad_input(gqa_checkpoint, tmp_path, args, fragment, run_module):
    ckpt_dir, _, _ = gqa_checkpoint
    (tmp_path / "EMPTY").write_text("")
    args = [str(tmp_path / "EMPTY") if a == "EMPTY" else a for a in args]
    result = run_module(*args, "--ckpt-dir", ckpt_dir)
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr


def test_compare_without_the_reference_says_how_to_install(gqa_checkpoint, cli, monkeypatch):
    from llama3_raw.tools.compare import main
    ckpt_dir, _, _ = gqa_checkpoint
    for name in [name for name in sys.modules if name == "llama_models" or name.startswith("llama_models.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed: every import of it fails
    result = cli("--ckpt-dir", ckpt_dir, entry=main)
    assert result.returncode == 2
    assert "pip install --no-deps llama-models" in result.stderr and "Traceback" not in result.stderr
