"""Meta's real Llama-3-8B: set LLAMA3_CKPT_DIR to the folder with consolidated.00.pth, params.json, tokenizer.model."""

import os
from pathlib import Path

import pytest
import torch

from helpers import FORTY_TWO_PROMPT
from llama3_raw import cast_weights, forward, load_checkpoint, load_tokenizer

CKPT_DIR = os.environ.get("LLAMA3_CKPT_DIR")
pytestmark = pytest.mark.skipif(not CKPT_DIR, reason="LLAMA3_CKPT_DIR is not set (no official weights here)")


def test_42():
    ckpt = load_checkpoint(CKPT_DIR)
    tokenizer = load_tokenizer(Path(CKPT_DIR) / "tokenizer.model")
    ids = tokenizer.encode(FORTY_TWO_PROMPT, bos=True)
    assert ids == [128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220]
    weights = cast_weights(ckpt.weights, torch.bfloat16, "cpu")
    with torch.inference_mode():
        logits, _ = forward(weights, ckpt.params, torch.tensor([ids]))
    next_id = int(logits[0, -1].argmax())
    assert next_id == 2983 and tokenizer.decode([next_id]) == "42"
