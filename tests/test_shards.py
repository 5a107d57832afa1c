"""Model-parallel checkpoints (Meta's 70B/405B layout) against Meta's own resharding code.

Oracle: `reshard_mp` from llama_models/checkpoint.py, the function Meta uses to merge model-parallel
shards into fewer ranks. Merged tensors must be identical (torch.equal), and the logits of the merged
model identical to those of the same weights saved as one file.
"""

import json

import pytest
import torch
from llama_models.checkpoint import reshard_mp

from helpers import TINY_GQA, TINY_MQA, random_state_dict, write_checkpoint, write_sharded_checkpoint
from llama3_raw import UserError, cast_weights, forward, load_checkpoint

# GQA cut in 2 (one kv head per shard, as 70B's 8 kv heads on 8 shards); 4 kv heads cut in 4; the multi-query
# shape cut in 2 (half a kv head per shard: Meta never ships that, but the merge is the same concatenation).
CASES = [(TINY_GQA, 2), (dict(TINY_GQA, n_kv_heads=4), 4), (TINY_MQA, 2)]


@pytest.mark.parametrize("p, n_shards", CASES)
def test_merged_tensors_equal_metas_reshard_mp(tmp_path, p, n_shards):
    state = random_state_dict(p, seed=7)
    ckpt_dir = write_sharded_checkpoint(tmp_path, p, state, n_shards)
    shards = [torch.load(ckpt_dir / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(n_shards)]
    expected = reshard_mp(shards, size=1, rank=0) if n_shards > 1 else shards[0]  # Meta: merge to one rank
    merged = load_checkpoint(ckpt_dir, show_progress=False).weights
    assert set(merged) == set(expected)
    for key, tensor in expected.items():
        assert merged[key].dtype == tensor.dtype
        assert torch.equal(merged[key], tensor), key
        assert torch.equal(merged[key], state[key])


def test_sharded_logits_equal_single_file_logits(tmp_path):
    p = dict(TINY_GQA, n_kv_heads=4)
    state = random_state_dict(p, seed=8, with_output=False)  # also: a tied output across shards
    single = load_checkpoint(write_checkpoint(tmp_path / "one", p, state, tokenizer=None), show_progress=False)
    sharded = load_checkpoint(write_sharded_checkpoint(tmp_path / "four", p, state, 4, tokenizer=None),
                              show_progress=False)
    assert sharded.tied_output and sharded.weights["output.weight"] is sharded.weights["tok_embeddings.weight"]
    tokens = torch.randint(0, p["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    a, _ = forward(cast_weights(single.weights, torch.float32, "cpu"), single.params, tokens)
    b, _ = forward(cast_weights(sharded.weights, torch.float32, "cpu"), sharded.params, tokens)
    assert torch.equal(a, b)


def test_missing_shard_number_is_named(tmp_path):
    ckpt_dir = write_sharded_checkpoint(tmp_path, TINY_GQA, random_state_dict(TINY_GQA), 2, tokenizer=None)
    (ckpt_dir / "consolidated.01.pth").rename(ckpt_dir / "consolidated.02.pth")
    with pytest.raises(UserError, match=r"consolidated\.01\.pth is missing"):
        load_checkpoint(ckpt_dir, show_progress=False)


def test_shard_that_does_not_fit_is_named(tmp_path):
    p = TINY_GQA
    ckpt_dir = write_sharded_checkpoint(tmp_path, p, random_state_dict(p), 2, tokenizer=None)
    shard = torch.load(ckpt_dir / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wo.weight"] = shard["layers.1.attention.wo.weight"][:, :-8].clone()
    torch.save(shard, ckpt_dir / "consolidated.01.pth")
    with pytest.raises(UserError, match=r"give layers\.1\.attention\.wo\.weight 56 along dim 1 but params\.json implies 64"):
        load_checkpoint(ckpt_dir, show_progress=False)


def test_norm_copies_must_agree(tmp_path):
    ckpt_dir = write_sharded_checkpoint(tmp_path, TINY_GQA, random_state_dict(TINY_GQA), 2, tokenizer=None)
    shard = torch.load(ckpt_dir / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, ckpt_dir / "consolidated.01.pth")
    with pytest.raises(UserError, match=r"consolidated\.01\.pth: norm\.weight differs from the copy in shard 00"):
        load_checkpoint(ckpt_dir, show_progress=False)


def test_too_many_shards_for_params(tmp_path):
    p = TINY_GQA
    ckpt_dir = write_sharded_checkpoint(tmp_path, p, random_state_dict(p), 2, tokenizer=None)
    (ckpt_dir / "params.json").write_text(json.dumps(dict(p, dim=32)))
    with pytest.raises(UserError, match=r"consolidated\.00\.pth"):
        load_checkpoint(ckpt_dir, show_progress=False)
