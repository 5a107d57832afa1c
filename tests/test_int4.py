"""int4 weights: the stored layout, PyTorch's int4 kernel against the dequantized formula, the model against
bf16, saved int4 folders, and the refusals.

Independent sources of truth:
- the stored layout is written out by hand here from its definition (int4_layouts.py's text);
- the CPU kernel's arrangement is PyTorch's own `_convert_weight_to_int4pack_for_cpu`, which `cpu_unpack`
  must invert exactly;
- products are checked against x @ W.T computed in float32 from the dequantized formula
  W = (q - 8) * scale + zero, itself checked against the original weights (half a step).
Tolerances: a bf16 result is within 1 % of the largest output (a few bf16 rounding steps). The tiny random
model in int4 against bf16: the logits' RMS error within 25 % of the bf16 logits' RMS, the same top-1 token
at >= 60 % of positions. Random weights are the hard case (no margin between logits): measured on three
such models, int4 gives 14.5-15.4 % and 70-75 %, int8 1.5 % and 93-98 %; the step of int4 is 16x coarser.
A wrong nibble order or group would give errors near 100 %.
"""

import json

import pytest
import torch

from helpers import TINY_GQA, changed_copy, random_state_dict, write_checkpoint
from llama3_raw import cast_weights, compiled, fast_forward, kernels, load_checkpoint
from llama3_raw.checkpoints.quantized import int4_weight
from llama3_raw.int4_layouts import (BLOCK_CANDIDATES, cpu_block_rows, cpu_unpack, pack_for_cpu, plain_from_values,
                                    values_from_plain)
from llama3_raw.model import forward, new_kv_cache
from llama3_raw.quantize import Int4Weight, dequantize, quantize_int4, quantize_weights


@pytest.fixture
def pytorch_kernels(monkeypatch):
    """PyTorch's int4 kernel and its arrangement, as where the compiled kernels (test_decode_kernels.py) are not built."""
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
INT4_LOGIT_RMS_TOLERANCE = 0.25
INT4_TOP1_AGREEMENT = 0.6


def test_the_stored_layout_is_two_values_a_byte_even_column_high():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 7]])
    assert plain_from_values(q).tolist() == [[0x12, 0x34], [0xF0, 0x87]]
    assert torch.equal(values_from_plain(plain_from_values(q)), q.to(torch.uint8))


@pytest.mark.parametrize("rows", [64, 128 + 48, 16])  # whole blocks, a partial last block, a single small block
def test_cpu_unpack_inverts_pytorchs_own_packing(rows):
    if cpu_block_rows() is None:
        pytest.skip("this CPU's int4 arrangement is none that cpu_unpack knows; prompts use the kernel itself")
    q = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(cpu_unpack(packed, rows, 96, *cpu_block_rows()).to(torch.int32), q)
    assert torch.equal(pack_for_cpu(plain_from_values(q)).view(-1), packed.view(-1))  # packed a block at a time


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step_per_group(group_size):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[6, 3] = 30.0  # an outlier widens only its own group's step
    q = quantize_int4(w, group_size)
    assert q.shape == (48, 256) and q.group_size == group_size and q.packed.dtype == torch.uint8
    assert q.scales_and_zeros.shape == (256 // group_size, 48, 2)
    step = q.scales_and_zeros[..., 0].float().T.repeat_interleave(group_size, dim=1)  # (out, in)
    error = (dequantize(q).float() - w.float()).abs()
    # half a step, plus the one rounding of the dequantized weight to bf16 (2^-8 of its size)
    assert (error <= step / 2 * (1 + 1e-3) + w.float().abs() * 2 ** -8).all()
    assert error[6, :group_size].max() > error[7, :group_size].max()  # the outlier's group is coarser
    assert error[6, group_size:].max() <= step[6, group_size:].max()  # ...and only its group
    assert error[5].max() < 1e-30


def test_int4_products_match_the_dequantized_formula(monkeypatch, pytorch_kernels):
    w = quantize_int4(torch.randn(176, 128, generator=torch.Generator().manual_seed(1)), 32).to("cpu")
    assert w.layout == "cpu"
    reference = dequantize(w).float()
    x = torch.randn(1, 9, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    expected = x.float() @ reference.T
    tolerance = 0.01 * expected.abs().max().item()
    one_row = kernels.matmul(x[:, :1], w)  # decoding: PyTorch's int4 kernel
    torch.testing.assert_close(one_row.float(), expected[:, :1], rtol=0, atol=tolerance)
    torch.testing.assert_close(kernels.matmul(x, w).float(), expected, rtol=0, atol=tolerance)  # a short prompt: the same
    monkeypatch.setattr(kernels, "INT4_KERNEL_MAX_ROWS", 4)  # a long prompt: dequantized blocks, the ordinary multiply
    torch.testing.assert_close(kernels.matmul(x, w).float(), expected, rtol=0, atol=tolerance)
    monkeypatch.setattr(kernels, "DEQUANTIZE_ELEMENTS", 64 * 128)  # blocks of 64 rows: two whole, one of 48
    torch.testing.assert_close(kernels.matmul(x, w).float(), expected, rtol=0, atol=tolerance)


def test_int4_model_within_tolerance_of_bf16(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    quantized = quantize_weights(ckpt.weights, torch.bfloat16, "int4", 32)
    assert isinstance(quantized["layers.0.attention.wq.weight"], Int4Weight)
    assert quantized["tok_embeddings.weight"] is ckpt.weights["tok_embeddings.weight"]  # looked up, not multiplied
    tokens = torch.randint(0, 128256, (1, 40), generator=torch.Generator().manual_seed(2))
    bf16_logits, _ = forward(ckpt.weights, ckpt.params, tokens)
    int4_logits, _ = forward(quantized, ckpt.params, tokens)
    rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
    assert rms(int4_logits - bf16_logits) < INT4_LOGIT_RMS_TOLERANCE * rms(bf16_logits)
    assert (int4_logits.argmax(-1) == bf16_logits.argmax(-1)).float().mean() >= INT4_TOP1_AGREEMENT
    # decoding through the cache (one row per call: the int4 kernel) gives the prompt's logits
    # (model.py's own products, and those the decode loop links in: fast_forward.py)
    for step_forward in (forward, fast_forward.forward):
        cache = new_kv_cache(ckpt.params, 1, 40, torch.bfloat16)
        _, cache = step_forward(quantized, ckpt.params, tokens[:, :39], cache)
        step, _ = step_forward(quantized, ckpt.params, tokens[:, 39:], cache)
        torch.testing.assert_close(step[:, 0], int4_logits[:, -1], rtol=0.02, atol=0.05 * int4_logits.abs().max().item())


def test_a_rank_slice_of_saved_int4_weights_is_the_slice_of_the_whole(pytorch_kernels):
    """Tensor parallelism cuts saved int4 matrices in their stored layout: rows with their scales and zeros,
    columns (wo, w2) along whole groups; a cut inside a group is refused in one sentence."""
    from llama3_raw.checkpoints.slicing import check_int4_part, slice_weight
    from llama3_raw.errors import UserError

    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole = quantize_int4(w, 32)
    for dim, start, stop in ((0, 16, 48), (0, 64, 192), (1, 64, 192)):
        expected = dequantize(whole).narrow(dim, start, stop - start)
        for source in (whole, whole.to("cpu")):  # as saved plain, and as saved in this CPU's arrangement
            part = slice_weight(source, dim, start, stop)
            assert torch.equal(dequantize(part), expected) and torch.equal(dequantize(part.to("cpu")), expected)
    if cpu_block_rows() is not None:  # whole blocks of rows of the CPU arrangement stay a view of it
        arranged = whole.to("cpu")
        part = slice_weight(arranged, 0, 64, 192)
        assert part.layout == "cpu"
        assert part.packed.untyped_storage().data_ptr() == arranged.packed.untyped_storage().data_ptr()
    with pytest.raises(UserError, match="layers.0.attention.wo.weight cannot be multiplied: its inputs from 16 on "
                                        "do not start a group of 32; run on fewer ranks"):
        check_int4_part("layers.0.attention.wo.weight", whole, 1, 16, 144)
    with pytest.raises(UserError, match="its 8 rows are not a multiple of 16"):
        check_int4_part("layers.0.attention.wk.weight", whole, 0, 8, 16)
    check_int4_part("layers.0.attention.wo.weight", whole, 1, 128, 256)  # whole groups, 64 rows: fine


def arranged(values: torch.Tensor, block_rows: int, halves: bool) -> torch.Tensor:
    """Values 0..15 (out, in) in a CPU kernel's arrangement, written out from its description in PyTorch's
    int4mm_kernel.cpp (blocks of rows; per input, byte j holds row j and row j + BLOCK_N/2, or rows 2j and 2j+1)."""
    pieces, full = [], values.shape[0] // block_rows * block_rows
    for start in range(0, full, block_rows):
        block = values[start:start + block_rows].T  # (in, BLOCK_N)
        low, high = (block[:, :block_rows // 2], block[:, block_rows // 2:]) if halves else (block[:, 0::2], block[:, 1::2])
        pieces.append((low | high << 4).reshape(-1))
    if values.shape[0] > full:
        block = values[full:].T
        pieces.append((block[:, 0::2] | block[:, 1::2] << 4).reshape(-1))
    return torch.cat(pieces).view(values.shape[0], -1)


def test_the_written_out_arrangement_is_pytorchs():
    if cpu_block_rows() is None:
        pytest.skip("this CPU's int4 arrangement is none that cpu_unpack knows")
    q = torch.randint(0, 16, (176, 64), generator=torch.Generator().manual_seed(8), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(arranged(q.to(torch.uint8), *cpu_block_rows()).view(-1), packed.view(-1))


def error_lines(result) -> list[str]:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_saved_int4_checkpoint_loads_as_the_same_int4_model(gqa_checkpoint, tmp_path, pytorch_kernels, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    saved = tmp_path / "int4"
    first = cli("--ckpt-dir", ckpt_dir, "--quantize", "int4", "--save-quantized", saved, "--max-new-tokens", 6, "--json")
    assert first.returncode == 0, first.stderr
    assert "with int4 weights" in first.stderr
    assert sorted(p.name for p in saved.iterdir()) == ["model.int4.pth", "params.json", "tokenizer.model"]

    # Memory-mapped, weights_only, and on this machine already in its CPU kernel's arrangement: no copy at all.
    loaded = load_checkpoint(saved, show_progress=False)
    made_now = quantize_weights(load_checkpoint(ckpt_dir, show_progress=False).weights, torch.bfloat16, "int4")
    assert loaded.source_format == "int4" and list(loaded.weights) == list(made_now)
    for key, w in made_now.items():
        if isinstance(w, Int4Weight):
            assert loaded.weights[key].layout == w.layout == "cpu"
            assert torch.equal(loaded.weights[key].packed, w.packed)
            assert torch.equal(loaded.weights[key].scales_and_zeros, w.scales_and_zeros)
            assert cast_weights({key: loaded.weights[key]}, torch.bfloat16, "cpu")[key].packed is loaded.weights[key].packed
        else:
            assert torch.equal(loaded.weights[key], w)
    # Half a byte per quantized weight, 4 bytes per group for scale and zero, the rest in bf16: nothing else.
    payload = sum(w.nbytes if isinstance(w, Int4Weight) else 2 * w.numel() for w in made_now.values())
    assert payload <= (saved / "model.int4.pth").stat().st_size < payload + 200_000
    state = torch.load(saved / "model.int4.pth", weights_only=True, mmap=True)
    assert state["int4_cpu_arrangement"].tolist() == list(cpu_block_rows())
    # Bytes saved by a machine whose CPU kernel arranges them otherwise are read back to the same values.
    w1 = made_now["layers.0.feed_forward.w1.weight"]
    for block_rows, halves in BLOCK_CANDIDATES:
        elsewhere = int4_weight(arranged(values_from_plain(w1.plain()), block_rows, halves), w1.scales_and_zeros,
                                (block_rows, halves))
        assert torch.equal(elsewhere.plain(), w1.plain())

    second = cli("--ckpt-dir", saved, "--max-new-tokens", 6, "--json")
    assert second.returncode == 0, second.stderr
    assert "with int4 weights" in second.stderr
    assert json.loads(second.stdout)["tokens"] == json.loads(first.stdout)["tokens"]


def test_int4_requests_that_cannot_work_are_refused_before_loading(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    # TINY_GQA's feed-forward hidden size is 224: groups of 32 fit, groups of 64 do not
    assert error_lines(cli("--ckpt-dir", ckpt_dir, "--quantize", "int4", "--group-size", "64")) == [
        f"error: --quantize int4 cannot take layers.0.feed_forward.w2.weight of {ckpt_dir}: its 224 inputs do not "
        f"split into groups of 64; pass --group-size 32."]
    [line] = error_lines(cli("--ckpt-dir", ckpt_dir, "--quantize", "int4", "--group-size", "48"))
    assert "--group-size" in line and "48" in line
    assert error_lines(cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--group-size", "32")) == [
        "error: --group-size only applies to int4 weights; add --quantize int4 (or drop --group-size)."]
    assert error_lines(cli("--ckpt-dir", ckpt_dir, "--quantize", "int4", "--dtype", "float32")) == [
        "error: --quantize int4 computes in bfloat16 (int4 weights, bf16 activations); drop --dtype float32."]
    one_kv_head = dict(TINY_GQA, n_kv_heads=1)  # wk and wv: 8 rows, fewer than the kernels' 16
    odd_rows = write_checkpoint(tmp_path / "odd", one_kv_head, random_state_dict(one_kv_head, seed=4))
    assert error_lines(cli("--ckpt-dir", odd_rows, "--quantize", "int4")) == [
        f"error: --quantize int4 cannot take layers.0.attention.wk.weight of {odd_rows}: its 8 rows are not a "
        f"multiple of 16; use --quantize int8."]


def test_int4_on_ranks_checks_each_ranks_part(gqa_checkpoint):
    """Under torchrun each rank quantizes its part: TINY_GQA's 16 rows of wk are 8 per rank on 2 ranks."""
    from llama3_raw.checkpoints import open_folder
    from llama3_raw.checkpoints.folder import check_int4_shapes
    from llama3_raw.errors import UserError
    from llama3_raw.parallel import Ranks

    folder = open_folder(gqa_checkpoint[0])
    check_int4_shapes(folder, 32, Ranks(0, 1))
    with pytest.raises(UserError, match=r"each of 2 ranks' part of layers.0.attention.wk.weight .*: its 8 rows are not "
                                        r"a multiple of 16; use --quantize int8 or fewer ranks."):
        check_int4_shapes(folder, 32, Ranks(1, 2))


def test_damaged_int4_checkpoints_are_refused_in_one_sentence(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    good = tmp_path / "good"
    assert cli("--ckpt-dir", ckpt_dir, "--quantize", "int4", "--save-quantized", good, "--max-new-tokens", 1).returncode == 0

    def variant(name, change):
        return changed_copy(good, tmp_path / name, "model.int4.pth", change)

    again = "save the int4 weights again with run.py --quantize int4 --save-quantized."
    no_scales = variant("no_scales", lambda s: s.pop("layers.0.attention.wq.weight.scales_and_zeros"))
    assert error_lines(cli("--ckpt-dir", no_scales)) == [
        f"error: {no_scales / 'model.int4.pth'} does not match its params.json (missing "
        f"layers.0.attention.wq.weight.scales_and_zeros); {again}"]
    unpacked = variant("unpacked", lambda s: s.update({"layers.1.feed_forward.w2.weight":
                                                       values_from_plain(s["layers.1.feed_forward.w2.weight"])}))
    [line] = error_lines(cli("--ckpt-dir", unpacked))
    assert "layers.1.feed_forward.w2.weight is (64, 224) torch.uint8" in line and again in line
    # groups of 16 (not a size the kernels take): every matrix's scales and zeros twice as many
    def regroup(s):
        for key in [k for k in s if k.endswith(".scales_and_zeros")]:
            s[key] = s[key].repeat_interleave(2, dim=0)
    [line] = error_lines(cli("--ckpt-dir", variant("groups16", regroup)))
    assert "group size 16 is none of 32, 64, 128" in line
    [line] = error_lines(cli("--ckpt-dir", good, "--quantize", "int8"))
    assert line == f"error: {good} holds int4 weights already; drop --quantize int8, or quantize the checkpoint they were made from."
    [line] = error_lines(cli("--ckpt-dir", good, "--dtype", "float32"))
    assert line == f"error: {good} holds int4 weights, which compute in bfloat16; drop --dtype float32."


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_int4_on_cuda_matches_the_cpu_kernel(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    on_cpu = quantize_weights(cast_weights(ckpt.weights, torch.bfloat16, "cpu"), torch.bfloat16, "int4")
    on_cuda = quantize_weights(cast_weights(ckpt.weights, torch.bfloat16, "cuda"), torch.bfloat16, "int4")
    assert on_cuda["layers.0.attention.wq.weight"].layout == "cuda"
    tokens = torch.randint(0, 128256, (1, 12), generator=torch.Generator().manual_seed(3))
    cpu_logits, _ = forward(on_cpu, ckpt.params, tokens)
    cuda_logits, _ = forward(on_cuda, ckpt.params, tokens.cuda())
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, rtol=0.02, atol=0.02 * cpu_logits.abs().max().item())
