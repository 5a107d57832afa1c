"""--dtype auto (checkpoints/defaults.py): a bf16 checkpoint computes in bf16 where the CPU does bf16 natively,
in float32 where it does not; float32 checkpoints, explicit flags, CUDA, quantized weights and the compare tool
keep their dtypes; run and chat say on stderr which dtype and why (issue 24)."""

import pytest
import torch

from llama3_raw.checkpoints import defaults
from llama3_raw.checkpoints.defaults import (SMALL_MODEL_PARAMETERS, auto_cpu_dtype, auto_dtype_help, choose_dtype,
                                             native_bf16)
from llama3_raw.quantize import quantize_weights
from llama3_raw.tools import compare

BIG = 1_235_814_400  # Llama 3.2 1B
PLENTY = 128 << 30  # bytes free
NATIVE = {"avx512_bf16": True, "avx512_f": True}
PLAIN = {"avx512_bf16": False, "amx_bf16": False, "avx2": True}


@pytest.mark.parametrize("features,expected", [
    ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({"avx512_bf16": True, "amx_bf16": False}, True),
    (PLAIN, False), ({}, False), ({"avx512_f": True, "avx512_vnni": True}, False)])
def test_native_bf16_is_avx512_bf16_or_amx(features, expected):
    assert native_bf16(features) is expected


def test_a_big_bf16_checkpoint_computes_in_bf16_where_the_cpu_does_bf16_natively():
    dtype, reason = auto_cpu_dtype(torch.bfloat16, BIG, native=True, free_bytes=PLENTY)
    assert dtype == torch.bfloat16 and reason.startswith("bfloat16 (auto)") and "natively" in reason


def test_a_big_bf16_checkpoint_computes_in_float32_where_the_cpu_does_not():
    dtype, reason = auto_cpu_dtype(torch.bfloat16, BIG, native=False, free_bytes=PLENTY)
    assert dtype == torch.float32 and "no native bfloat16" in reason


def test_without_native_bf16_a_float32_copy_that_does_not_fit_stays_bf16():
    dtype, reason = auto_cpu_dtype(torch.bfloat16, BIG, native=False, free_bytes=8 * BIG - 1)
    assert dtype == torch.bfloat16 and "would not fit" in reason
    assert auto_cpu_dtype(torch.bfloat16, BIG, native=False, free_bytes=8 * BIG + 8)[0] == torch.float32


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("free", [PLENTY, 1 << 20])
def test_a_float32_checkpoint_stays_float32(native, free):
    dtype, reason = auto_cpu_dtype(torch.float32, BIG, native=native, free_bytes=free)
    assert dtype == torch.float32 and "own dtype" in reason


def test_a_small_model_stays_float32_even_with_native_bf16():
    """The shipped 5M model: the same tokens on every machine (the docs' checked outputs are float32's)."""
    assert auto_cpu_dtype(torch.bfloat16, SMALL_MODEL_PARAMETERS - 1, True, PLENTY)[0] == torch.float32
    assert auto_cpu_dtype(torch.bfloat16, SMALL_MODEL_PARAMETERS, True, PLENTY)[0] == torch.bfloat16


def test_a_float16_checkpoint_is_not_taken_for_bf16():
    assert auto_cpu_dtype(torch.float16, BIG, native=True, free_bytes=PLENTY)[0] == torch.float32


def weights_of(dtype, n=64):
    return {"tok_embeddings.weight": torch.zeros(n, 32, dtype=dtype), "norm.weight": torch.ones(32, dtype=dtype)}


def test_choose_dtype_reads_the_checkpoints_dtype_and_the_cpu(monkeypatch):
    monkeypatch.setattr(defaults, "SMALL_MODEL_PARAMETERS", 1)
    assert choose_dtype("auto", "cpu", weights_of(torch.bfloat16), cpu_features=NATIVE)[0] == torch.bfloat16
    assert choose_dtype("auto", "cpu", weights_of(torch.bfloat16), cpu_features=PLAIN)[0] == torch.float32
    assert choose_dtype("auto", "cpu", weights_of(torch.float32), cpu_features=NATIVE)[0] == torch.float32


@pytest.mark.parametrize("requested", ["float32", "bfloat16"])
@pytest.mark.parametrize("features", [NATIVE, PLAIN])
def test_an_explicit_dtype_wins(requested, features, monkeypatch):
    monkeypatch.setattr(defaults, "SMALL_MODEL_PARAMETERS", 1)
    for stored in (torch.bfloat16, torch.float32):
        dtype, reason = choose_dtype(requested, "cpu", weights_of(stored), cpu_features=features)
        assert dtype == defaults.DTYPES[requested] and "as asked" in reason


def test_cuda_and_quantized_weights_stay_bf16():
    assert choose_dtype("auto", "cuda", weights_of(torch.float32), cpu_features=PLAIN)[0] == torch.bfloat16
    quantized = quantize_weights({"layers.0.attention.wq.weight": torch.randn(64, 64, dtype=torch.bfloat16)},
                                 torch.bfloat16, "int8", 32)
    dtype, reason = choose_dtype("auto", "cpu", quantized, cpu_features=PLAIN)
    assert dtype == torch.bfloat16 and "int8" in reason


def test_help_states_the_rule_and_this_cpu():
    assert "this CPU has it" in auto_dtype_help(NATIVE) and "this CPU lacks it" in auto_dtype_help(PLAIN)


@pytest.fixture
def native_cpu(monkeypatch):
    """As on a CPU with AVX-512 BF16, with the tiny test checkpoints counted as big models."""
    monkeypatch.setattr(defaults, "SMALL_MODEL_PARAMETERS", 1)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NATIVE)


def test_run_says_which_dtype_and_why(gqa_checkpoint, cli, native_cpu):
    ckpt_dir, _, _ = gqa_checkpoint
    result = cli("--ckpt-dir", ckpt_dir, "--max-new-tokens", 1, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    loaded = next(i for i, line in enumerate(lines) if line.startswith("loaded "))
    assert " as bfloat16 " in lines[loaded]
    assert lines[loaded + 1].startswith("dtype bfloat16 (auto): the checkpoint's own dtype")

    result = cli("--ckpt-dir", ckpt_dir, "--max-new-tokens", 1, "--temperature", 0, "--dtype", "float32")
    assert "\ndtype float32, as asked (--dtype float32)\n" in result.stderr


def test_run_without_native_bf16_says_float32(gqa_checkpoint, cli, monkeypatch):
    monkeypatch.setattr(defaults, "SMALL_MODEL_PARAMETERS", 1)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: PLAIN)
    result = cli("--ckpt-dir", gqa_checkpoint[0], "--max-new-tokens", 1, "--temperature", 0)
    assert "\ndtype float32 (auto): this CPU has no native bfloat16 arithmetic" in result.stderr


def test_chat_says_which_dtype_and_why(gqa_checkpoint, cli, native_cpu):
    result = cli("--chat", "--ckpt-dir", gqa_checkpoint[0], "--message", "Hi", "--max-new-tokens", 1)
    assert result.returncode == 0, result.stderr
    assert "\ndtype bfloat16 (auto): the checkpoint's own dtype" in result.stderr


def test_compare_stays_float32_where_auto_would_pick_bf16(gqa_checkpoint, cli, native_cpu, monkeypatch):
    assert choose_dtype("auto", "cpu", weights_of(torch.bfloat16))[0] == torch.bfloat16  # auto would
    dtypes = []
    real_load_model = compare.load_model

    def spy(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        dtypes.append(model.dtype)
        return model

    monkeypatch.setattr(compare, "load_model", spy)
    result = cli("--ckpt-dir", gqa_checkpoint[0], "--json", entry=compare.main)
    assert result.returncode == 0, result.stderr
    assert dtypes == [torch.float32]
