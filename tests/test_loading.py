"""The loader: Meta's keys and shapes verified, tensors memory-mapped from the file, bad files refused."""

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY_GQA, meta_key_shapes, random_state_dict, write_checkpoint
from llama3_raw import UserError, cast_weights, load_checkpoint, load_params


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map `path` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_loads_meta_keys_in_order_with_checkpoint_dtype(gqa_checkpoint):
    ckpt_dir, p, state = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    assert list(ckpt.weights) == list(meta_key_shapes(p))
    for key, tensor in ckpt.weights.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[key])
    assert not ckpt.tied_output


def test_weights_are_views_of_the_mapped_file_and_bf16_compute_copies_nothing(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    ranges = mapped_ranges(ckpt_dir / "consolidated.00.pth")
    assert ranges, "the checkpoint file is not memory-mapped"
    for tensor in ckpt.weights.values():
        assert any(start <= tensor.data_ptr() < end for start, end in ranges)
    bf16 = cast_weights(ckpt.weights, torch.bfloat16, "cpu")
    assert all(bf16[k].data_ptr() == ckpt.weights[k].data_ptr() for k in bf16)


def test_missing_output_is_tied_to_embeddings_without_a_copy(scaled_tied_checkpoint):
    ckpt_dir, _, _ = scaled_tied_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    assert ckpt.tied_output
    assert ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]
    fp32 = cast_weights(ckpt.weights, torch.float32, "cpu")
    assert fp32["output.weight"] is fp32["tok_embeddings.weight"]


def test_params_fields_and_defaults(gqa_checkpoint):
    ckpt_dir, p, _ = gqa_checkpoint
    params = load_params(ckpt_dir / "params.json")
    assert (params.dim, params.n_heads, params.n_kv_heads, params.vocab_size) == (p["dim"], 8, 2, 128256)
    assert params.heads_per_kv_head == 4 and params.head_dim == 8
    assert params.context_len == 8192 and not params.use_scaled_rope
    with_scaling = json.loads((ckpt_dir / "params.json").read_text()) | {"use_scaled_rope": True}
    (ckpt_dir.parent / "p31.json").write_text(json.dumps(with_scaling))
    assert load_params(ckpt_dir.parent / "p31.json").context_len == 131072


class Opaque:
    pass


def broken_checkpoints(tmp: Path):
    """Name -> (directory, expected fragment of the error message)."""
    good = random_state_dict(TINY_GQA, seed=9)
    cases = {}

    def make(name, state=good, params=TINY_GQA):
        return write_checkpoint(tmp / name, params, state, tokenizer=None)

    # said to a Python caller too: no command-line advice as the whole of it (README's record snippet met that)
    cases["missing dir"] = (tmp / "nowhere", "does not exist; name a folder that holds params.json")
    d = make("no params")
    (d / "params.json").unlink()
    cases["no params"] = (d, "params.json does not exist")
    d = make("bad json")
    (d / "params.json").write_text("{dim: 64,")
    cases["bad json"] = (d, "not valid JSON")
    d = make("missing field")
    (d / "params.json").write_text(json.dumps({k: v for k, v in TINY_GQA.items() if k != "n_heads"}))
    cases["missing field"] = (d, "missing field(s) n_heads")
    d = make("no pth")
    (d / "consolidated.00.pth").unlink()
    cases["no pth"] = (d, "has no consolidated.00.pth")
    d = make("truncated")
    data = (d / "consolidated.00.pth").read_bytes()
    (d / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, "truncated or corrupt")
    d = make("garbage")
    (d / "consolidated.00.pth").write_bytes(b"\x00garbage" * 1000)
    cases["garbage"] = (d, "truncated or corrupt")
    d = make("legacy")
    torch.save(good, d / "consolidated.00.pth", _use_new_zipfile_serialization=False)
    cases["legacy"] = (d, "legacy (non-zip) format")
    cases["code in pickle"] = (make("code", state={**good, "extra": Opaque()}), "other than plain tensors")
    cases["not tensors"] = (make("ints", state={**good, "step": 3}), "not tensors")
    cases["not a dict"] = (make("list", state=[good["norm.weight"]]), "not a dict of tensors")
    cases["missing key"] = (make("missing", state={k: v for k, v in good.items() if k != "layers.1.ffn_norm.weight"}),
                            "missing 1 key(s) such as layers.1.ffn_norm.weight")
    cases["extra key"] = (make("extra", state={**good, "rope.freqs": torch.zeros(4)}), "unexpected key(s) such as rope.freqs")
    cases["wrong shape"] = (make("shape", state={**good, "layers.0.attention.wk.weight": torch.zeros(64, 64)}),
                            "layers.0.attention.wk.weight has shape (64, 64)")
    cases["shape vs params"] = (make("params disagree", params=dict(TINY_GQA, n_kv_heads=4)), "params.json implies")
    return cases


def test_bad_checkpoints_raise_one_clear_user_error(tmp_path):
    for name, (ckpt_dir, fragment) in broken_checkpoints(tmp_path).items():
        with pytest.raises(UserError) as info:
            load_checkpoint(ckpt_dir, show_progress=False)
        message = str(info.value)
        assert fragment in message, f"{name}: {message}"
        assert "\n" not in message, name


def test_the_page_cache_is_asked_what_it_holds_and_a_cached_file_is_not_read_again(tmp_path, monkeypatch):
    import os

    from llama3_raw.checkpoints import meta

    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(4 << 20))
    assert meta.cached_fraction(path) == 1.0  # just written: every page is in the page cache
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: the kernel drops them
    assert meta.cached_fraction(path) < 0.5
    reads = []  # the sequential reads (unbuffered opens); mincore's mapping opens the file too

    def spy(*args, **kwargs):
        if kwargs.get("buffering") == 0:
            reads.append(args)
        return open(*args, **kwargs)

    monkeypatch.setattr(meta, "open", spy, raising=False)
    meta.warm_page_cache(path, show_progress=False)  # mostly not cached: read
    assert len(reads) == 1 and meta.cached_fraction(path) == 1.0
    meta.warm_page_cache(path, show_progress=False)  # all cached: not read again
    assert len(reads) == 1
