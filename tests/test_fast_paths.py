"""The fast paths do the same math: bf16 vs fp32 block by block, int8 vs bf16, zero-copy bf16 loading, CUDA.

Tolerances, stated once:
- bf16 vs fp32: every block's output within 3 % of that block's largest fp32 value (bf16 keeps 8 bits of
  mantissa, a relative step of 0.4 %; two tiny blocks of random weights accumulate a few steps).
- int8 vs bf16: logits within 5 % of the largest bf16 logit, and the same top-1 token at >= 90 % of positions.
- int8 round trip: |W - values * scale| <= scale / 2 for every element (computed in float32).
"""

import json

import pytest
import torch

from helpers import RSS_SHAPE, TINY_GQA, changed_copy, probe_rss, python_m, random_state_dict, write_random_checkpoint
from llama3_raw import cast_weights, fast_forward, kernels, load_checkpoint
from llama3_raw.generate import generate
from llama3_raw.kernels import int8_matmul, matmul, row_times_matrix
from llama3_raw.model import forward, new_kv_cache
from llama3_raw.params import params_from_dict
from llama3_raw.quantize import Int8Weight, dequantize, quantize_int8, quantize_weights

BF16_BLOCK_TOLERANCE = 0.03
INT8_LOGIT_TOLERANCE = 0.05
INT8_TOP1_AGREEMENT = 0.9


def tokens_for(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, 128256, (1, length), generator=torch.Generator().manual_seed(seed))


def test_bf16_blocks_within_tolerance_of_fp32(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    tokens = tokens_for(0, 24)
    fp32_record, bf16_record = {}, {}
    forward(cast_weights(ckpt.weights, torch.float32, "cpu"), ckpt.params, tokens, record=fp32_record)
    forward(ckpt.weights, ckpt.params, tokens, record=bf16_record)  # the file's bf16 tensors, as they are
    block_outputs = [f"layers.{i}.output" for i in range(ckpt.params.n_layers)] + ["logits"]
    for name in block_outputs:
        reference, ours = fp32_record[name], bf16_record[name].float()
        assert bf16_record[name].dtype == (torch.float32 if name == "logits" else torch.bfloat16)
        error = (ours - reference).abs().max() / reference.abs().max()
        assert error < BF16_BLOCK_TOLERANCE, f"{name}: {error:.4f}"


def test_last_only_logits_are_the_last_row_of_all_logits(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    weights = cast_weights(ckpt.weights, torch.float32, "cpu")
    tokens = tokens_for(1, 9)
    every, _ = forward(weights, ckpt.params, tokens)
    last, _ = forward(weights, ckpt.params, tokens, last_only=True)
    assert last.shape == (1, 1, ckpt.params.vocab_size)
    torch.testing.assert_close(last[:, 0], every[:, -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [96, 90, 7])  # fp32: blocks of 8 rows; blocks of 2; a prime: one block
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_products_give_the_plain_product(rows, threads, dtype):
    w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = x.double() @ w.double().T  # float64 product: independent of the kernel and its blocking
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        blocked = row_times_matrix(x, w)
        through_matmul = matmul(x, w)
        strided = row_times_matrix(x, w.T.contiguous().T)  # not contiguous: no view, plain product
    finally:
        torch.set_num_threads(previous)
    assert torch.backends.mkldnn.enabled  # switched off only inside the product
    assert blocked.shape == (1, 1, rows) and strided.shape == (1, 1, rows) and blocked.dtype == dtype
    # fp32: summation order only. bf16: the fp32 sum rounded once to bf16 (8 bits: a relative step of 2^-8).
    atol, rtol = (1e-5, 0) if dtype == torch.float32 else (1e-3, 2 ** -8)
    torch.testing.assert_close(blocked.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(strided.double(), expected, rtol=rtol, atol=atol)
    assert torch.equal(through_matmul, blocked)


def test_int8_round_trip_is_within_half_a_scale_step():
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w[7] = 0.0  # an all-zero row must not divide by zero
    w[8, 3] = 40.0  # an outlier widens only its own row's step
    q = quantize_int8(w, torch.bfloat16)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and q.values.abs().max() <= 127
    restored = q.values.float() * q.scales.float()[:, None]
    error = (restored - w.float()).abs()
    assert (error <= q.scales.float()[:, None] / 2 * (1 + 1e-6)).all()
    assert error[8, :3].max() > error[9].max()  # the outlier's row is coarser than its neighbours
    assert torch.equal(restored[7], torch.zeros(96))


def test_int8_matmul_kernel_and_dequantized_formula_agree(monkeypatch):
    w = quantize_int8(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), torch.bfloat16)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    one_row = int8_matmul(x, w)  # the int8 kernel (decode)
    expected = x.float() @ dequantize(w).float().T
    tolerance = 0.01 * expected.abs().max().item()  # a bf16 result: a few rounding steps of the largest output
    torch.testing.assert_close(one_row.float(), expected, rtol=0, atol=tolerance)
    many_rows = int8_matmul(x.expand(1, 3, 128), w)  # the dequantizing path (prefill), one block here
    torch.testing.assert_close(many_rows[:, 1:2].float(), one_row.float(), rtol=0, atol=tolerance)
    monkeypatch.setattr(kernels, "DEQUANTIZE_ELEMENTS", 10 * 128)  # blocks of 10 rows: 6 full, one of 4
    in_blocks = int8_matmul(x.expand(1, 3, 128), w)
    torch.testing.assert_close(in_blocks.float(), many_rows.float(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("rows, cols", [(7, 100), (16, 36), (24, 2050), (8, 48)])
def test_int8_one_row_products_are_right_for_any_input_count(rows, cols):
    """PyTorch 2.13's _weight_int8pack_mm reads past the row unless the inputs come in whole tiles of 16 (wrong sums,
    or a segmentation fault, with 36, 100 or 2050 inputs): such matrices (a model trained here with an unusual
    size) must take the other path and still be right."""
    w = quantize_int8(torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)), torch.bfloat16)
    expected = dequantize(w).float()
    for seed in range(20):  # the misreads depend on what lies past the row; a few tries catch them
        x = torch.randn(1, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        reference = x.float() @ expected.T
        torch.testing.assert_close(int8_matmul(x, w).float(), reference, rtol=0, atol=0.01 * reference.abs().max().item())


def test_int8_model_within_tolerance_of_bf16(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    quantized = quantize_weights(ckpt.weights, torch.bfloat16)
    assert isinstance(quantized["layers.0.attention.wq.weight"], Int8Weight)
    assert quantized["tok_embeddings.weight"] is ckpt.weights["tok_embeddings.weight"]  # looked up, not multiplied
    tokens = tokens_for(2, 40)
    bf16_logits, _ = forward(ckpt.weights, ckpt.params, tokens)
    int8_logits, _ = forward(quantized, ckpt.params, tokens)
    assert (int8_logits - bf16_logits).abs().max() < INT8_LOGIT_TOLERANCE * bf16_logits.abs().max()
    agreement = (int8_logits.argmax(-1) == bf16_logits.argmax(-1)).float().mean()
    assert agreement >= INT8_TOP1_AGREEMENT
    # and decoding through the cache (one row per call: the int8 kernel) gives the prefill's logits
    # (model.py's own products, and those the decode loop links in: fast_forward.py)
    for step_forward in (forward, fast_forward.forward):
        cache = new_kv_cache(ckpt.params, 1, 40, torch.bfloat16)
        _, cache = step_forward(quantized, ckpt.params, tokens[:, :39], cache)
        step, _ = step_forward(quantized, ckpt.params, tokens[:, 39:], cache)
        torch.testing.assert_close(step[:, 0], int8_logits[:, -1], rtol=0.02, atol=0.05 * int8_logits.abs().max().item())


LOAD_AND_GENERATE = """
from llama3_raw import load_checkpoint, cast_weights
from llama3_raw.generate import generate
ckpt = load_checkpoint(sys.argv[1], show_progress=False)
weights = cast_weights(ckpt.weights, torch.bfloat16, "cpu")
tokens = list(generate(weights, ckpt.params, [128000, 5, 6, 7], 4, stop_ids=()))
"""


@pytest.mark.slow  # a memory probe on a checkpoint of a few hundred MB, in a fresh interpreter
def test_bf16_generation_adds_no_second_copy_of_the_weights(tmp_path):
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", RSS_SHAPE, seed=5)
    file_bytes = (ckpt_dir / "consolidated.00.pth").stat().st_size
    assert file_bytes > 200e6
    rss = probe_rss(LOAD_AND_GENERATE, ckpt_dir)
    assert rss["tokens"] == 4
    # Everything the process gained: the file's mapped pages (once), the tiny cache and activations,
    # a fraction of the largest matrix's logits. A copy of the weights would add another file_bytes.
    grown = rss["after"] - rss["before"]
    assert grown <= 1.1 * file_bytes + 60e6, f"grew by {grown / 1e6:.0f} MB for a {file_bytes / 1e6:.0f} MB file"
    assert rss["peak"] <= rss["before"] + 1.1 * file_bytes + 60e6 + 50e6  # torch's start-up peak is below `before`


def test_forward_keeps_every_tensor_on_the_weights_device():
    """What `--device cuda` needs, checked without a GPU: on PyTorch's `meta` device (shapes, no data), an
    elementwise op that meets a CPU tensor fails, so a mask, rotation or cache left on the CPU would raise."""
    params = params_from_dict(TINY_GQA)
    weights = {key: t.to("meta") for key, t in random_state_dict(TINY_GQA, seed=1).items()}
    for weights_now in (weights, quantize_weights(weights, torch.bfloat16)):
        cache = new_kv_cache(params, 1, 12, torch.bfloat16, device="meta")
        logits, cache = forward(weights_now, params, torch.zeros(1, 7, dtype=torch.long, device="meta"), cache)
        step, cache = forward(weights_now, params, torch.zeros(1, 1, dtype=torch.long, device="meta"), cache,
                              last_only=True)
        assert logits.device.type == step.device.type == cache.keys[0].device.type == "meta"
        assert (logits.shape, step.shape, cache.length) == ((1, 7, 128256), (1, 1, 128256), 8)
    batch_cache = new_kv_cache(params, 2, 12, torch.bfloat16, device="meta")
    positions = torch.arange(7) - torch.tensor([[0], [3]])  # rows padded by 0 and 3 (meta tensors hold no values)
    logits, _ = forward(weights, params, torch.zeros(2, 7, dtype=torch.long, device="meta"), batch_cache,
                        positions=positions)
    assert logits.device.type == "meta" and logits.shape == (2, 7, 128256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_generation_matches_cpu(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    cpu = cast_weights(ckpt.weights, torch.float32, "cpu")
    cuda = cast_weights(ckpt.weights, torch.float32, "cuda")
    assert all(t.is_cuda for t in cuda.values())
    tokens = tokens_for(3, 12)
    cpu_logits, _ = forward(cpu, ckpt.params, tokens)
    cuda_logits, _ = forward(cuda, ckpt.params, tokens.cuda())
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, rtol=1e-3, atol=1e-3)
    prompt = tokens[0].tolist()
    assert (list(generate(cuda, ckpt.params, prompt, 8, (), device="cuda"))
            == list(generate(cpu, ckpt.params, prompt, 8, ())))
    quantized = quantize_weights(cast_weights(ckpt.weights, torch.bfloat16, "cuda"), torch.bfloat16)
    assert len(list(generate(quantized, ckpt.params, prompt, 4, (), device="cuda"))) == 4


def test_cli_quantize_int8_generates_and_refuses_float32(gqa_checkpoint, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    result = cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--max-new-tokens", 5, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["dtype"] == "bfloat16" and len(out["tokens"]) == 5
    assert "with int8 weights" in result.stderr
    refused = cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--dtype", "float32")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if "error:" in line] == [
        "error: --quantize int8 computes in bfloat16 (int8 weights, bf16 activations); drop --dtype float32."]


def test_saved_int8_checkpoint_loads_as_the_same_int8_model(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    saved = tmp_path / "int8"
    first = cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--save-quantized", saved, "--max-new-tokens", 6, "--json")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in saved.iterdir()) == ["model.int8.pth", "params.json", "tokenizer.model"]
    assert json.loads((saved / "params.json").read_text()) == json.loads((ckpt_dir / "params.json").read_text())

    # In this process: the same int8 values and scales that quantizing at load time makes, memory-mapped.
    loaded = load_checkpoint(saved, show_progress=False)
    made_now = quantize_weights(load_checkpoint(ckpt_dir, show_progress=False).weights, torch.bfloat16)
    assert loaded.source_format == "int8" and list(loaded.weights) == list(made_now)
    for key, w in made_now.items():
        if isinstance(w, Int8Weight):
            assert torch.equal(loaded.weights[key].values, w.values) and torch.equal(loaded.weights[key].scales, w.scales)
        else:
            assert torch.equal(loaded.weights[key], w)
    # One byte per quantized weight plus its scales, the rest (embeddings, norms) in bf16: nothing else stored.
    payload = sum(w.values.numel() + 2 * w.scales.numel() if isinstance(w, Int8Weight) else 2 * w.numel()
                  for w in made_now.values())
    assert payload <= (saved / "model.int8.pth").stat().st_size < payload + 200_000

    # A later run loads the folder directly (no --quantize) and generates the same tokens.
    second = cli("--ckpt-dir", saved, "--max-new-tokens", 6, "--json")
    assert second.returncode == 0, second.stderr
    assert "with int8 weights" in second.stderr
    assert json.loads(second.stdout)["tokens"] == json.loads(first.stdout)["tokens"]
    assert json.loads(second.stdout)["dtype"] == "bfloat16"


def error_lines(result) -> list[str]:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_save_quantized_refuses_bad_requests_and_leaves_files_alone(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    assert error_lines(cli("--ckpt-dir", ckpt_dir, "--save-quantized", tmp_path / "new")) == [
        "error: --save-quantized writes quantized weights; add --quantize int8 or --quantize int4."]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert error_lines(cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--save-quantized", occupied)) == [
        f"error: --save-quantized {occupied} already exists and is not an empty folder; choose a new folder name."]
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "keep me"


def test_damaged_int8_checkpoints_are_refused_in_one_sentence(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    good = tmp_path / "good"
    assert cli("--ckpt-dir", ckpt_dir, "--quantize", "int8", "--save-quantized", good, "--max-new-tokens", 1).returncode == 0

    def variant(name, change):
        return changed_copy(good, tmp_path / name, "model.int8.pth", change)

    no_scales = variant("no_scales", lambda s: s.pop("layers.0.attention.wq.weight.scales"))
    assert error_lines(cli("--ckpt-dir", no_scales)) == [
        f"error: {no_scales / 'model.int8.pth'} does not match its params.json (missing "
        f"layers.0.attention.wq.weight.scales); save the int8 weights again with run.py --quantize int8 --save-quantized."]
    not_int8 = variant("not_int8", lambda s: s.update({"layers.1.feed_forward.w2.weight":
                                                       s["layers.1.feed_forward.w2.weight"].to(torch.bfloat16)}))
    [line] = error_lines(cli("--ckpt-dir", not_int8))
    assert "layers.1.feed_forward.w2.weight is" in line and "torch.int8" in line
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file in ("params.json", "tokenizer.model"):
        (truncated / file).write_bytes((good / file).read_bytes())
    (truncated / "model.int8.pth").write_bytes((good / "model.int8.pth").read_bytes()[:5000])
    [line] = error_lines(cli("--ckpt-dir", truncated))
    assert "model.int8.pth is truncated or corrupt" in line
    [line] = error_lines(cli("--ckpt-dir", good, "--dtype", "float32"))
    assert line == f"error: {good} holds int8 weights, which compute in bfloat16; drop --dtype float32."
    compare = cli("compare", "--ckpt-dir", good, entry=python_m)
    assert error_lines(compare) == [f"error: {good} holds int8 weights, which Meta's reference cannot run; compare "
                                    f"the checkpoint they were quantized from."]


def test_attention_products_through_float32_when_decoding():
    """kernels.batched_matmul: a few query rows in bf16 on the CPU go through float32 and are rounded once to bf16
    (what a bf16 product returns, summed in another order); many rows are the ordinary product, bit for bit."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 8, 64, 37, generator=generator).to(torch.bfloat16)  # (B, K, Dh, T): scores' right side
    few = torch.randn(1, 8, 4, 64, generator=generator).to(torch.bfloat16)  # decoding: n query heads x 1 position
    exact = few.float() @ keys.float()
    result = kernels.batched_matmul(few, keys)
    assert result.dtype == torch.bfloat16 and torch.equal(result, exact.to(torch.bfloat16))
    torch.testing.assert_close(result.float(), (few @ keys).float(), rtol=2 ** -7, atol=1e-3)
    many = torch.randn(1, 8, kernels.FLOAT32_ATTENTION_ROWS + 1, 64, generator=generator).to(torch.bfloat16)
    assert torch.equal(kernels.batched_matmul(many, keys), many @ keys)
    assert torch.equal(kernels.batched_matmul(few.float(), keys.float()), few.float() @ keys.float())  # float32: as is
