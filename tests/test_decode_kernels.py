"""The compiled decode kernels (llama3_raw/csrc/decode_kernels.c) against PyTorch's float32 arithmetic.

Where the package was installed without them (CI runs the tests from a clone), conftest.py compiles them from
the same source, with the same flags as setup.py; where there is no C compiler or the CPU lacks AVX-512
BF16/VNNI/VBMI/GFNI, these tests skip. (The rest of a decode step: test_decode_steps.py.)

Reference: x @ W.T in float32 of the exact same (dequantized) weights. Bounds, derived from what each kernel
rounds (compiled.py's text), each plus the rounding of the result to bf16 (2^-8 of it) and float32 sums:
- bf16: products exact, so only float32 summation order: 1e-5 of sum |w x|;
- int8: each activation off by at most half an int16 step, block max / 65534:
        |error| <= sum_k |w_k| max_block(k) / 65534;
- int4: each activation off by at most block max / 254: |error| <= sum_k |w_k| max_block(k) / 254 -- and
        that bound must be met, not exceeded by a wrong nibble or scale (those give errors near 100 %).
The int4 dequantization is bit for bit quantize.dequantize_int4.
"""

import pytest
import torch

from llama3_raw import compiled, kernels
from llama3_raw.quantize import dequantize_int4, layout_for, quantize_int4, quantize_int8

def int8_exact(q) -> torch.Tensor:
    """values * scale in float32: the kernel never rounds the weights to bf16, as quantize.dequantize does."""
    return q.values.float() * q.scales.float()[:, None]


def int4_exact(q) -> torch.Tensor:
    """(values - 8) * scale + zero in float32 (quantize.py's text), unrounded as the kernel uses it."""
    scale, zero = q.scales_and_zeros.float().permute(1, 0, 2).repeat_interleave(q.group_size, dim=1).unbind(-1)
    return (q.values().float() - 8) * scale + zero


def block_max(x: torch.Tensor) -> torch.Tensor:
    """Each input's block max |x| (in,), the blocks of 32 the kernels round activations in."""
    return x.float().abs().view(-1, compiled.BLOCK).amax(dim=1).repeat_interleave(compiled.BLOCK)


def assert_within(result, w, x, activation_steps: float | None, slack: float = 1e-5):
    w, x = w.float(), x.float()
    expected = w @ x
    bound = slack * (w.abs() @ x.abs()) + expected.abs() * 2 ** -8
    if activation_steps:
        bound = bound + w.abs() @ block_max(x) / activation_steps
    error = (result.float() - expected).abs()
    assert (error <= bound + 1e-30).all(), f"worst excess {(error - bound).max().item():.3g}"
    return error, expected


@pytest.mark.parametrize("rows, cols, threads", [(64, 2048, 2), (37, 100, 2), (5, 31, 1), (33, 64, 3)])
def test_bf16_product(kernels_on, rows, cols, threads):
    generator = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    x = torch.randn(cols, generator=generator).to(torch.bfloat16)
    torch.set_num_threads(threads)
    try:
        error, expected = assert_within(compiled.bf16_products(x, [w])[0], w, x, None)
    finally:
        torch.set_num_threads(2)
    assert error.max() <= 2 ** -7 * expected.abs().max()


@pytest.mark.parametrize("rows, cols", [(64, 2048), (7, 96), (40, 32)])
def test_int8_product(kernels_on, rows, cols):
    generator = torch.Generator().manual_seed(rows + cols)
    q = quantize_int8(torch.randn(rows, cols, generator=generator))
    x = (torch.randn(cols, generator=generator) * torch.logspace(-3, 1, cols)).to(torch.bfloat16)  # uneven blocks
    assert_within(compiled.int8_products(x, [(q.values, q.scales)])[0], int8_exact(q), x, 65534)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows, cols", [(64, 2048), (48, 384), (7, 192), (3, 64)])  # 192, 64: a half window
def test_int4_product(kernels_on, rows, cols, group_size):
    if cols % group_size:
        pytest.skip("the group size does not divide the inputs")
    generator = torch.Generator().manual_seed(rows + cols + group_size)
    q = quantize_int4(torch.randn(rows, cols, generator=generator), group_size).to("cpu")
    assert q.layout == "plain" and q.scales_and_zeros.transpose(0, 1).is_contiguous()  # as the kernel reads it
    x = (torch.randn(cols, generator=generator) * torch.logspace(-3, 1, cols)).to(torch.bfloat16)
    result = compiled.int4_products(x, [(q.packed, q.scales_and_zeros)])[0]
    error, expected = assert_within(result, int4_exact(q), x, 254)
    assert error.max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_dequantization_is_bit_for_bit(kernels_on, group_size):
    q = quantize_int4(torch.randn(96, 256, generator=torch.Generator().manual_seed(group_size)), group_size).to("cpu")
    out = torch.empty(40, 256, dtype=torch.bfloat16)
    rows = compiled.int4_dequantize(q.packed, q.scales_and_zeros, 256, 48, out)
    assert torch.equal(rows, dequantize_int4(q.values(), q.scales_and_zeros)[48:88])


def test_kernels_refuse_what_they_cannot_take(kernels_on):
    w = torch.randn(32, 64).to(torch.bfloat16)
    assert compiled.bf16_products(torch.randn(64), [w]) is None  # float32 activations
    assert compiled.bf16_products(torch.randn(32).to(torch.bfloat16), [w.T]) is None  # not contiguous
    q8 = quantize_int8(torch.randn(8, 48))
    assert compiled.int8_products(torch.randn(48).to(torch.bfloat16), [(q8.values, q8.scales)]) is None  # 48: not whole blocks
    q4 = quantize_int4(torch.randn(16, 96), 32)  # 96 inputs: not whole 64-input pieces
    assert not compiled.takes_int4(q4.shape, 32, torch.bfloat16)
    assert compiled.int4_products(torch.randn(96).to(torch.bfloat16), [(q4.packed, q4.scales_and_zeros)]) is None
    assert layout_for(torch.device("cpu"), q4.shape, 32, torch.bfloat16) == "cpu"  # so it goes to PyTorch's kernel
    by_column = quantize_int4(torch.randn(16, 64), 32)  # scales and zeros as quantized: by group, not by row
    assert compiled.int4_products(torch.randn(64).to(torch.bfloat16), [(by_column.packed, by_column.scales_and_zeros)]) is None


def test_switched_off_by_the_environment(kernels_on, monkeypatch):
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
    assert not compiled.usable()
    assert compiled.bf16_products(torch.randn(32).to(torch.bfloat16), [torch.randn(16, 32).to(torch.bfloat16)]) is None


@pytest.mark.parametrize("n_rows", [1, 3, 40])  # one row (decoding), a few (kernel row by row), many (dequantized)
def test_matmul_through_the_kernels_agrees_with_pytorch_paths(kernels_on, monkeypatch, n_rows):
    generator = torch.Generator().manual_seed(n_rows)
    w = torch.randn(96, 256, generator=generator).to(torch.bfloat16)
    x = torch.randn(1, n_rows, 256, generator=generator).to(torch.bfloat16)
    int8, int4 = quantize_int8(w), quantize_int4(w, 32).to("cpu")
    assert int4.layout == "plain"  # what the compiled kernels read
    for weight, exact, steps in ((w, w, None), (int8, int8_exact(int8), 65534), (int4, int4_exact(int4), 254)):
        result = kernels.matmul(x, weight)
        # Many rows take PyTorch's multiply of bf16 weights (rounded to bf16 when dequantized, int8's product
        # rounded before its scale): up to two more bf16 roundings, 2^-7 of sum |w x|.
        slack = 1e-5 if n_rows == 1 else 2 ** -7
        for row in range(n_rows):
            assert_within(result[0, row], exact, x[0, row], steps, slack)


def test_the_model_decodes_the_same_tokens_with_and_without(kernels_on, monkeypatch, gqa_checkpoint):
    from llama3_raw import load_checkpoint
    from llama3_raw.fast_forward import forward  # the decode loop's: the compiled pieces linked in
    from llama3_raw.model import new_kv_cache
    ckpt = load_checkpoint(gqa_checkpoint[0], show_progress=False)
    tokens = torch.randint(0, 128256, (1, 12), generator=torch.Generator().manual_seed(3))

    def last_logits():
        cache = new_kv_cache(ckpt.params, 1, 12, torch.bfloat16)
        _, cache = forward(ckpt.weights, ckpt.params, tokens[:, :11], cache)
        return forward(ckpt.weights, ckpt.params, tokens[:, 11:], cache)[0][0, -1].float()

    with_kernels = last_logits()
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
    without = last_logits()
    assert (with_kernels - without).abs().max() <= 0.02 * without.abs().max()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_non_finite_products(kernels_on, bad):
    """As PyTorch's products would, so that the decode loop's refusal of non-finite logits still sees them: a NaN or
    infinity must not be rounded to some finite integer on its way into the int8 or int4 products."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    x = torch.randn(128, generator=torch.Generator().manual_seed(10))
    x[70] = bad
    x = x.to(torch.bfloat16)
    q8, q4 = quantize_int8(w), quantize_int4(w, 32).to("cpu")
    for results in (compiled.bf16_products(x, [w.to(torch.bfloat16)]), compiled.int8_products(x, [(q8.values, q8.scales)]),
                    compiled.int4_products(x, [(q4.packed, q4.scales_and_zeros)])):
        result, = results
        assert not result.float().isfinite().any()


def test_saved_int4_folder_keeps_the_kernels_layout_and_maps_back_without_a_copy(kernels_on, monkeypatch, gqa_checkpoint,
                                                                                tmp_path):
    """Saved where the kernels run: plain values, each row's scales and zeros side by side; loaded there, the
    matrices are the mapped file's own bytes; loaded where they do not run, PyTorch's arrangement, same weights."""
    from llama3_raw import cast_weights, load_checkpoint
    from llama3_raw.checkpoints import default_tokenizer_path
    from llama3_raw.checkpoints.quantized import save_quantized_checkpoint
    from llama3_raw.quantize import Int4Weight, dequantize, quantize_weights

    ckpt_dir = gqa_checkpoint[0]
    whole = load_checkpoint(ckpt_dir, show_progress=False)
    made = quantize_weights(whole.weights, torch.bfloat16, "int4")
    saved = save_quantized_checkpoint(made, whole.params, "int4", default_tokenizer_path(ckpt_dir), tmp_path / "int4")
    loaded = load_checkpoint(saved, show_progress=False)
    key = "layers.0.feed_forward.w1.weight"
    mapped = loaded.weights[key]
    assert mapped.layout == "plain" and mapped.scales_and_zeros.transpose(0, 1).is_contiguous()
    on_cpu = cast_weights({key: mapped}, torch.bfloat16, "cpu")[key]
    assert on_cpu.packed.data_ptr() == mapped.packed.data_ptr()  # multiplied from the file's bytes
    assert on_cpu.scales_and_zeros.data_ptr() == mapped.scales_and_zeros.data_ptr()
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")
    elsewhere = cast_weights({key: load_checkpoint(saved, show_progress=False).weights[key]}, torch.bfloat16, "cpu")[key]
    assert isinstance(elsewhere, Int4Weight) and elsewhere.layout != "plain"
    assert torch.equal(dequantize(elsewhere), dequantize(made[key]))
