import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import helpers.py as a plain module

from helpers import TINY_GQA, TINY_MHA_SCALED, TINY_MQA, random_state_dict, write_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    """(directory, params dict, state dict) of a tiny GQA checkpoint: 8 query heads on 2 kv heads, bf16."""
    state = random_state_dict(TINY_GQA, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("gqa"), TINY_GQA, state), TINY_GQA, state


@pytest.fixture(scope="session")
def mqa_checkpoint(tmp_path_factory):
    state = random_state_dict(TINY_MQA, seed=2)
    return write_checkpoint(tmp_path_factory.mktemp("mqa"), TINY_MQA, state), TINY_MQA, state


@pytest.fixture(scope="session")
def scaled_tied_checkpoint(tmp_path_factory):
    """Llama 3.1-style scaled RoPE, and no output.weight (tied to the embeddings, as Llama 3.2 1B/3B)."""
    state = random_state_dict(TINY_MHA_SCALED, seed=3, with_output=False)
    return write_checkpoint(tmp_path_factory.mktemp("scaled"), TINY_MHA_SCALED, state), TINY_MHA_SCALED, state
