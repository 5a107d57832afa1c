"""The optional compiled one-row products (matvec/matvec.cpp) against PyTorch's own, which are the reference.

When the extension is not installed (CI), it is compiled here from the project's own source with
torch.utils.cpp_extension, so its code is tested wherever a C++ compiler and an AVX-512 BF16 CPU exist;
otherwise these tests skip. Bound, for y = W x summed in float32 and rounded once to bf16 (as PyTorch's
kernels do; only the order of the additions differs):
    |y - y_ref| <= 2^-8 |y_ref| + 2^-20 sum_k |W[r, k] x[k]|
(half a bf16 step of the result, twice over for the two roundings compared, plus float32 summation error).
"""

import shutil
from pathlib import Path

import pytest
import torch

from llama3_raw import kernels
from llama3_raw.quantize import quantize_int8

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def matvec(tmp_path_factory):
    if kernels.compiled is not None:
        module = kernels.compiled
    else:
        if shutil.which("c++") is None or not torch.cpu._is_avx512_bf16_supported():
            pytest.skip("no C++ compiler or no AVX-512 BF16 here: the compiled kernels cannot run")
        from torch.utils.cpp_extension import load
        build = tmp_path_factory.mktemp("matvec_build")
        module = load("llama3_raw_matvec", [str(REPO / "matvec" / "matvec.cpp")], extra_cflags=["-O3"],
                      build_directory=str(build))
    if not module.supported():
        pytest.skip("this CPU lacks AVX-512 BF16")
    return module


def within_bound(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> bool:
    reference = w.float() @ x.float()
    magnitude = w.float().abs() @ x.float().abs()
    return bool(((y.float() - reference).abs() <= 2 ** -8 * reference.abs() + 2 ** -20 * magnitude + 1e-30).all())


@pytest.mark.parametrize("rows, cols", [(64, 2048), (130, 96), (7, 100), (1, 31), (300, 4096)])  # whole, tails
def test_bf16_matvec_within_bound_of_the_float32_product(matvec, rows, cols):
    generator = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
    x = torch.randn(cols, generator=generator).to(torch.bfloat16)
    y = matvec.bf16_matvec(x, w)
    assert y.shape == (rows,) and y.dtype == torch.bfloat16
    assert within_bound(y, w, x)
    with kernels.without_onednn():
        assert within_bound((x[None] @ w.T)[0], w, x)  # PyTorch's own meets the same bound


@pytest.mark.parametrize("rows, cols", [(64, 2048), (130, 96), (7, 100), (1, 15)])
def test_int8_matvec_within_bound_of_the_dequantized_product(matvec, rows, cols):
    generator = torch.Generator().manual_seed(rows + cols)
    q = quantize_int8(torch.randn(rows, cols, generator=generator), torch.bfloat16)
    x = torch.randn(cols, generator=generator).to(torch.bfloat16)
    y = matvec.int8_matvec(x, q.values, q.scales)
    dequantized = q.values.float() * q.scales.float()[:, None]
    assert y.shape == (rows,) and within_bound(y, dequantized, x)
    if cols % kernels.INT8_KERNEL_COLUMNS == 0:  # where PyTorch's own int8 kernel can be used, it meets the same bound
        assert within_bound(torch._weight_int8pack_mm(x[None], q.values, q.scales)[0], dequantized, x)


def test_the_model_uses_them_for_one_row_and_can_be_told_not_to(matvec, monkeypatch):
    monkeypatch.setattr(kernels, "compiled", matvec)
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    assert kernels.compiled_kernels() is matvec
    assert torch.equal(kernels.matmul(x, w)[0, 0], matvec.bf16_matvec(x.reshape(-1), w))
    monkeypatch.setenv("LLAMA3_RAW_COMPILED", "0")
    assert kernels.compiled_kernels() is None
    assert within_bound(kernels.matmul(x, w)[0, 0], w, x[0, 0])  # PyTorch's product, the fallback
