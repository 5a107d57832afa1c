"""The benchmark compares like with like: Meta's reference and Hugging Face's model, built by bench/worker.py
from our weight dict, pick the same greedy tokens as our generate() (Hugging Face's q/k row permutation
and Llama 3.1 RoPE scaling included)."""

import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_GQA, TINY_MHA_SCALED, write_random_checkpoint
from llama3_raw import cast_weights, load_checkpoint
from llama3_raw.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import worker  # noqa: E402


@pytest.mark.parametrize("shape, tied", [(TINY_GQA, False), (TINY_MHA_SCALED, True)])
@pytest.mark.parametrize("impl", ["meta", "hf"])
def test_bench_implementations_decode_the_same_tokens(tmp_path, shape, tied, impl):
    if impl == "hf":
        pytest.importorskip("transformers")
    ckpt = load_checkpoint(write_random_checkpoint(tmp_path, shape, seed=3, with_output=not tied), show_progress=False)
    weights = cast_weights(ckpt.weights, torch.float32, "cpu")
    prompt = [128000] + list(range(100, 120))
    ours = list(generate(weights, ckpt.params, prompt, 8, stop_ids=()))
    if impl == "hf":
        prefill, decode_step = worker.hugging_face(weights, ckpt.params, torch.float32, ckpt.tied_output)
    else:
        prefill, decode_step = worker.meta_reference(weights, ckpt.params, max_seq_len=64)
    tokens = [prefill(prompt)]
    for step in range(7):
        tokens.append(decode_step(tokens[-1], len(prompt) + step))
    assert tokens == ours


def test_q4_0_reference_rounds_as_ggml_does():
    """bench.quantized_accuracy's Q4_0 reference point, checked against values worked by hand from ggml's
    quantize_row_q4_0_ref: d = (signed value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), (q - 8) d."""
    from bench.quantized_accuracy import q4_0_rounded

    negative = torch.zeros(32)
    negative[:4] = torch.tensor([-1.0, 0.5, 0.25, 0.3])  # d = 0.125: 0.3 / 0.125 + 8.5 = 10.9 -> 10 -> 0.25
    positive = torch.zeros(32)
    positive[:3] = torch.tensor([2.0, 1.0, -0.3])  # d = -0.25: -0.3 / -0.25 + 8.5 = 9.7 -> 9 -> -0.25
    rounded = q4_0_rounded(torch.stack([negative, positive]).to(torch.bfloat16)).float()
    assert rounded[0, :4].tolist() == [-1.0, 0.5, 0.25, 0.25] and rounded[1, :3].tolist() == [2.0, 1.0, -0.25]
    assert not rounded[:, 4:].any() and not q4_0_rounded(torch.zeros(1, 32)).any()  # an all-zero block stays zero
