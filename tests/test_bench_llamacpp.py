"""bench/llamacpp.py, llama.cpp's rows in the benchmark: the parts that need no llama.cpp (reading llama-bench's
JSON, the launcher's peak RSS, the refusal without a build, the ratio table) always run; the GGUF conversion and a
llama-bench run on a tiny checkpoint run only where `python -m bench.llamacpp setup` has built llama.cpp."""

import ctypes
import importlib
import json
import subprocess
import sys
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from helpers import TINY_MHA_SCALED, write_random_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.__main__ as bench_main  # noqa: E402
from bench import llamacpp  # noqa: E402

# Captured from `llama-bench -m q4_0.gguf -p 512 -n 64 -t 2 -r 1 -o json`, built by `python -m bench.llamacpp setup`
# from llama-cpp-python 0.3.36's vendored llama.cpp on this project's 2-core VM (the bench's random 1B shape);
# cut to the fields a reader may want, values as printed.
LLAMA_BENCH_SAMPLE = """[
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "backends": "CPU",
   "model_filename": "bench/out/ckpt-1b-gguf/q4_0.gguf", "model_type": "llama 1B Q4_0", "model_size": 763097216,
   "model_n_params": 1235814432, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "type_k": "f16", "type_v": "f16",
   "flash_attn": -1, "repack": true, "n_prompt": 512, "n_gen": 0, "n_depth": 0, "test_time": "2026-11-25T23:10:24Z",
   "avg_ns": 9283792282, "stddev_ns": 0, "avg_ts": 55.149877, "stddev_ts": 0.000000,
   "samples_ns": [ 9283792282 ], "samples_ts": [ 55.1499 ]},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "backends": "CPU",
   "model_filename": "bench/out/ckpt-1b-gguf/q4_0.gguf", "model_type": "llama 1B Q4_0", "model_size": 763097216,
   "model_n_params": 1235814432, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "type_k": "f16", "type_v": "f16",
   "flash_attn": -1, "repack": true, "n_prompt": 0, "n_gen": 64, "n_depth": 0, "test_time": "2026-11-25T23:10:42Z",
   "avg_ns": 10520597896, "stddev_ns": 0, "avg_ts": 6.083304, "stddev_ts": 0.000000,
   "samples_ns": [ 10520597896 ], "samples_ts": [ 6.0833 ]}
]"""
BUILT = llamacpp.missing_build() is None


def test_llama_bench_json_gives_prefill_and_decode_speed():
    timing = llamacpp.parse_llama_bench(LLAMA_BENCH_SAMPLE)
    assert timing["prefill_tok_s"] == pytest.approx(55.149877) and timing["n_prompt"] == 512
    assert timing["decode_tok_s"] == pytest.approx(6.083304) and timing["n_gen"] == 64
    assert timing["model_size"] == 763097216 and timing["build_commit"] == "0c1e570"
    with pytest.raises(ValueError, match="one prompt and one generation test"):
        llamacpp.parse_llama_bench(json.dumps(json.loads(LLAMA_BENCH_SAMPLE)[:1]))


@pytest.mark.slow  # a memory probe: a real launcher and its child
def test_launcher_reports_the_peak_rss_of_its_child_not_of_the_bench():
    ballast = b"x" * (300 << 20)  # the bench's own memory, which a child of the bench would report as its peak
    child = [sys.executable, "-c", "import sys; data = b'y' * (100 << 20); sys.exit(3)"]
    result = subprocess.run([sys.executable, "-S", "-c", llamacpp.LAUNCHER, *child], capture_output=True, text=True)
    assert result.returncode == 3 and len(ballast) > 0
    assert 100 << 20 < llamacpp.parse_peak_rss(result.stderr) < 250 << 20


def test_bench_without_a_build_stops_in_one_sentence(tmp_path, monkeypatch, capsys):
    for name in ("BIN", "SOURCE", "PYDEPS"):
        monkeypatch.setattr(llamacpp, name, tmp_path / name)
    monkeypatch.setattr(sys, "argv", ["python -m bench", "--impls", "ours", "llamacpp", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        bench_main.main()
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert "python -m bench.llamacpp setup" in message and "cmake" in message and "llama-bench" in message
    assert not (tmp_path / "out").exists()  # stopped before writing a checkpoint


def block_llama_models(monkeypatch) -> None:
    for name in [name for name in sys.modules if name.startswith("llama_models.")] + ["llama_models"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed: every import of it fails


def test_bench_without_llama_models_stops_in_one_sentence(tmp_path, monkeypatch, capsys):
    block_llama_models(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["python -m bench", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        bench_main.main()
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message and message.startswith("error: ")
    assert "llama_models" in message and message.endswith(
        "run pip install -r requirements-test.txt && pip install --no-deps llama-models first.")
    assert not (tmp_path / "out").exists()  # stopped before writing a checkpoint


def test_bench_asks_for_llama_models_only_where_it_needs_it(monkeypatch):
    block_llama_models(monkeypatch)
    assert bench_main.missing_requirements(["ours", "ours-int8"], checkpoint_written=True) == []
    assert bench_main.missing_requirements(["ours"], checkpoint_written=False) == ["llama_models"]  # its tokenizer
    assert bench_main.missing_requirements(["ours", "meta"], checkpoint_written=True) == ["llama_models"]


def test_setup_downloads_only_llama_cpp_pythons_source(tmp_path):
    command = llamacpp.download_command(tmp_path)
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert command[command.index("--no-binary") + 1] == "llama-cpp-python" and command.count("--no-binary") == 1
    assert ":all:" not in command and "--no-deps" in command
    assert f"llama-cpp-python=={llamacpp.VERSION}" in command and command[command.index("-d") + 1] == str(tmp_path)


def fake_run(impl: str, dtype: str, decode: float, prefill: float, rss_gb: float, file_gb: float, per_token: float,
             load_s: float | None = 1.0) -> dict:
    return {"impl": impl, "dtype": dtype, "load_s": load_s, "peak_rss_bytes": rss_gb * 1e9, "file_bytes": file_gb * 1e9,
            "kv_cache_bytes": 0, "prefill_short_tok_s": None if load_s is None else 2 * prefill,
            "prefill_long_tok_s": prefill, "decode_tok_s": decode, "bytes_per_token": per_token * 1e9,
            "bandwidth_after_decode": 10e9}


def test_ratio_table_pairs_whichever_of_our_widths_ran():
    runs = [[fake_run("ours", "float32", 2.0, 50.0, 5.0, 2.5, 5.0)], [fake_run("ours", "bfloat16", 4.0, 60.0, 2.6, 2.5, 2.5)],
            [fake_run("ours-int4", "bfloat16", 12.0, 30.0, 1.0, 1.0, 0.8)],
            [fake_run("llamacpp-bf16", "BF16", 5.0, 120.0, 2.6, 2.5, 2.5, load_s=None)],
            [fake_run("llamacpp-q8_0", "Q8_0", 8.0, 150.0, 1.4, 1.3, 1.3, load_s=None)],
            [fake_run("llamacpp-q4_0", "Q4_0", 10.0, 100.0, 0.8, 0.8, 0.8, load_s=None)]]
    rows = [bench_main.summarise(group, 20e9) for group in runs]
    lines = llamacpp.ratio_table(rows).splitlines()
    bf16 = [line for line in lines if line.startswith("| bf16 |")]
    int4 = [line for line in lines if line.startswith("| int4 |")]
    assert bf16 == ["| bf16 | ours vs llama.cpp BF16 | 0.80× | 0.80× | 0.80× | 0.50× | 1.00× | 1.00× | 1.00× | 50% vs 62% |"]
    assert int4 == ["| int4 | ours-int4 vs llama.cpp Q4_0 | 1.20× | 1.20× | 1.20× | 0.30× | 1.25× | 1.25× | 1.00× | 48% vs 40% |"]
    assert not any(line.startswith("| int8 |") for line in lines)  # no ours-int8 row: no pair
    assert llamacpp.ratio_table(rows[:1] + rows[3:]) == ""  # ours in float32 only: nothing like with like

    args = Namespace(shape="1b", reps=1, short_prompt=17, long_prompt=512, decode_steps=32)
    table = bench_main.markdown_table([rows[1], rows[3]], args, 20e9, 2)
    assert "| llama.cpp BF16 | BF16 | 2.50 | – | 2.60 (2.60–2.60) | – | 120.0 (120.0–120.0) |" in table


def llamacpp_logits(gguf: Path, prompt: list[int], monkeypatch) -> torch.Tensor:
    """Last-position logits from the libllama built beside llama-bench, through llama-cpp-python 0.3.36's own
    ctypes bindings in the sdist (imported without the package's __init__, which needs more than they do)."""
    package = types.ModuleType("llama_cpp")
    package.__path__ = [str(llamacpp.SOURCE.parent.parent / "llama_cpp")]
    monkeypatch.setitem(sys.modules, "llama_cpp", package)
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(llamacpp.BIN))
    ll = importlib.import_module("llama_cpp.llama_cpp")
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
    params = ll.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 64, 2, 2
    context = ll.llama_init_from_model(model, params)
    assert ll.llama_decode(context, ll.llama_batch_get_one((ll.llama_token * len(prompt))(*prompt), len(prompt))) == 0
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    logits = torch.tensor(ctypes.cast(ll.llama_get_logits_ith(context, -1), ctypes.POINTER(ctypes.c_float))[:n_vocab])
    ll.llama_free(context)
    ll.llama_model_free(model)
    return logits


@pytest.mark.skipif(not BUILT, reason="llama.cpp not built (python -m bench.llamacpp setup)")
def test_gguf_files_compute_the_checkpoints_function(tmp_path, monkeypatch):
    """The 1B shape's case, tiny: Llama 3.1 RoPE scaling and a tied output (about a minute: gguf-py reads the
    vocabulary slowly). The same with TINY_GQA and an output matrix of its own passed when it was written."""
    from llama3_raw import cast_weights, load_checkpoint
    from llama3_raw.model import forward

    ckpt = write_random_checkpoint(tmp_path / "ckpt", TINY_MHA_SCALED, seed=5, with_output=False)
    paths = llamacpp.write_ggufs(ckpt, threads=2)
    assert not (tmp_path / "ckpt-gguf" / "hf").exists()
    errors = llamacpp.tensor_errors(ckpt, paths["llamacpp-bf16"])
    assert set(errors.values()) == {0.0}  # wq/wk included: Hugging Face's permutation undone by llama.cpp's

    checkpoint = load_checkpoint(ckpt, show_progress=False)
    prompt = [128000] + [(7919 * i) % 120000 + 500 for i in range(30)]
    ours = forward(cast_weights(checkpoint.weights, torch.float32, "cpu"), checkpoint.params, torch.tensor([prompt]),
                   last_only=True)[0][0, -1]
    theirs = llamacpp_logits(paths["llamacpp-bf16"], prompt, monkeypatch)
    assert float((theirs - ours).norm() / ours.norm()) < 0.02

    per_token, by_type = llamacpp.bytes_read_per_token(paths["llamacpp-q8_0"])
    assert per_token == sum(by_type.values()) > 0 and set(by_type) == {"F32", "Q8_0"}  # tied: token_embd is read
    monkeypatch.setattr(llamacpp, "PROMPT", 32)
    monkeypatch.setattr(llamacpp, "GENERATE", 8)
    run = llamacpp.run_llama_bench("llamacpp-q8_0", paths["llamacpp-q8_0"], 2, checkpoint.params)
    assert run["llama_bench"]["n_prompt"] == 32 and run["decode_steps"] == 8 and run["bytes_per_token"] == per_token
    assert run["decode_tok_s"] > 0 and run["prefill_long_tok_s"] > 0 and 0 < run["peak_rss_bytes"] < 2e9


def test_each_width_runs_right_after_ours_and_is_compared_rep_by_rep():
    """The bandwidth drifts: a pair run back to back is compared within its repetition. Medians of the two
    columns would say 20 / 30 = 0.67x here; the repetitions' ratios 2, 0.5 and 1 have the median 1."""
    assert bench_main.rep_order(["ours", "ours-int4", "meta", "llamacpp"], "bfloat16", "bfloat16") == [
        "ours", "llamacpp-bf16", "ours-int4", "llamacpp-q4_0", "llamacpp-q4_k_m", "meta", "llamacpp-q8_0"]
    assert bench_main.rep_order(["ours", "llamacpp"], "float32", "bfloat16") == ["ours"]  # its own types: once a rep
    assert bench_main.rep_order(["ours", "hf"], "bfloat16", "bfloat16") == ["ours", "hf"]
    ours = [fake_run("ours", "bfloat16", decode, 60.0, 2.6, 2.5, 2.5) for decode in (10.0, 20.0, 30.0)]
    theirs = [fake_run("llamacpp-bf16", "BF16", decode, 120.0, 2.6, 2.5, 2.5, load_s=None) for decode in (5.0, 40.0, 30.0)]
    line = llamacpp.ratio_table([bench_main.summarise(ours, 20e9), bench_main.summarise(theirs, 20e9)]).splitlines()[-1]
    assert line.startswith("| bf16 | ours vs llama.cpp BF16 | 0.67× | 1.00× | 1.00× |")


def test_the_same_rate_of_reading_at_another_bandwidth_compares_as_even():
    """Within a pair the bandwidth can still move: ours decoding 10 tok/s while the machine read 20 GB/s and theirs
    15 at 30 GB/s read at the same rate per GB/s (0.67x as raw speeds); a run without a reading gives no ratio."""
    ours = [dict(fake_run("ours", "bfloat16", 10.0, 60.0, 2.6, 2.5, 2.5), bandwidth_after_decode=20e9)]
    theirs = [dict(fake_run("llamacpp-bf16", "BF16", 15.0, 120.0, 2.6, 2.5, 2.5, load_s=None), bandwidth_after_decode=30e9)]
    line = llamacpp.ratio_table([bench_main.summarise(ours, 40e9), bench_main.summarise(theirs, 40e9)]).splitlines()[-1]
    assert line.startswith("| bf16 | ours vs llama.cpp BF16 | 0.67× | 0.67× | 1.00× |")
    theirs[0]["bandwidth_after_decode"] = None
    line = llamacpp.ratio_table([bench_main.summarise(ours, 40e9), bench_main.summarise(theirs, 40e9)]).splitlines()[-1]
    assert line.startswith("| bf16 | ours vs llama.cpp BF16 | 0.67× | 0.67× | – |")


def test_int4_in_groups_of_64_runs_right_after_q4_0_and_is_compared_with_it():
    """Groups of 64 read 4.5 bits a weight, as Q4_0 does: the like-for-like pair, run in the same stretch."""
    assert bench_main.rep_order(["ours-int4", "ours-int4-g64", "llamacpp"], "bfloat16", "bfloat16") == [
        "ours-int4", "llamacpp-q4_0", "ours-int4-g64", "llamacpp-q4_k_m", "llamacpp-bf16", "llamacpp-q8_0"]
    assert bench_main.rep_order(["ours-int4-g64", "llamacpp"], "bfloat16", "bfloat16") == [
        "ours-int4-g64", "llamacpp-q4_0", "llamacpp-bf16", "llamacpp-q8_0", "llamacpp-q4_k_m"]
    runs = [[fake_run("ours-int4", "bfloat16", 12.0, 30.0, 1.0, 1.0, 0.8)], [fake_run("ours-int4-g64", "bfloat16", 11.0, 30.0, 1.0, 1.0, 0.7)],
            [fake_run("llamacpp-q4_0", "Q4_0", 10.0, 100.0, 0.8, 0.8, 0.8, load_s=None)]]
    lines = llamacpp.ratio_table([bench_main.summarise(group, 20e9) for group in runs]).splitlines()
    assert [line.split(" | ")[:3] for line in lines if line.startswith("| int4")] == [
        ["| int4", "ours-int4 vs llama.cpp Q4_0", "1.20×"], ["| int4 g64", "ours-int4-g64 vs llama.cpp Q4_0", "1.10×"]]


def test_setup_builds_for_the_cpus_own_instruction_sets_without_amx():
    """An Intel VM listing amx_int8 killed ggml's AMX kernel with SIGILL; -march=native would compile it in."""
    options = llamacpp.isa_options({"avx2", "fma", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"})
    assert "-DGGML_NATIVE=OFF" in options and "-DGGML_AVX512=ON" in options and "-DGGML_AVX512_VNNI=ON" in options
    assert "-DGGML_AVX512_BF16=OFF" in options and "-DGGML_AMX_INT8=OFF" in options and "-DGGML_AMX_TILE=OFF" in options
    assert "-DGGML_AMX_INT8=OFF" in llamacpp.isa_options(set())  # flags unknown: native, still without AMX


def test_every_weight_has_its_llama_cpp_name():
    from bench.ggml_rounding import gguf_name
    from llama3_raw.params import params_from_dict

    params = params_from_dict(bench_main.SHAPES["1b"])
    names = {gguf_name(key) for key in params.weight_shapes()}
    assert len(names) == len(params.weight_shapes())  # no two weights share a name
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.15.ffn_down.weight",
            "blk.0.attn_v.weight", "blk.3.attn_norm.weight"} <= names


@pytest.mark.slow
@pytest.mark.skipif(not BUILT, reason="llama.cpp is not built (python -m bench.llamacpp setup)")
def test_llama_quantize_rounds_each_matrix_as_its_recipe_says(tmp_path):
    """Q8_0 changes a weight by about half a step of its block's scale (max / 127) at most; Q4_K_M mixes Q4_K with Q6_K
    (attn_v and ffn_down in some layers, the output matrix) and leaves the norms in float32."""
    from bench.ggml_rounding import rounded_by_llama_quantize
    from llama3_raw import load_checkpoint

    shape = dict(TINY_MHA_SCALED, dim=256, multiple_of=256, vocab_size=512)  # K-quants take rows of 256 inputs
    checkpoint = load_checkpoint(write_random_checkpoint(tmp_path / "ckpt", shape, seed=3, tokenizer=None),
                                 show_progress=False)
    weights = {key: w.float() for key, w in checkpoint.weights.items()}
    q8, types_q8 = rounded_by_llama_quantize(weights, checkpoint.params, "Q8_0")
    w = weights["layers.0.attention.wq.weight"]
    step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
    # half a step, and the scale's own rounding to float16 (2^-11 of it) over up to 127 steps
    assert ((q8["layers.0.attention.wq.weight"] - w).reshape(-1, 32).abs() <= (0.5 + 127 * 2**-11) * step).all()
    assert torch.equal(q8["norm.weight"], weights["norm.weight"]) and "Q8_0" in types_q8
    q4km, types_q4km = rounded_by_llama_quantize(weights, checkpoint.params, "Q4_K_M")
    assert {"Q4_K", "Q6_K"} <= set(types_q4km)
    error = float((q4km["layers.0.feed_forward.w1.weight"] - weights["layers.0.feed_forward.w1.weight"]).norm()
                  / weights["layers.0.feed_forward.w1.weight"].norm())
    assert 0.01 < error < 0.15  # 4-bit: ~8 % of the matrix's size (Q8_0 ~0.5 %)


def test_first_token_runs_one_token_in_a_new_process_each_and_compares_pairs_rep_by_rep():
    from bench import first_token

    ours = first_token.command("ours", Path("ckpt"), 2)
    theirs = first_token.command("llamacpp-q4_0", Path("q4_0.gguf"), 2)
    assert ours[ours.index("--max-new-tokens") + 1] == "1" and ours[-1] == first_token.PROMPT
    assert theirs[theirs.index("-n") + 1] == "1" and theirs[theirs.index("-p") + 1] == first_token.PROMPT
    run = lambda impl, s: {"impl": impl, "seconds": s, "peak_rss_bytes": 1e9, "file_bytes": 2e9}  # noqa: E731
    runs = {"ours-int4": [run("ours-int4", s) for s in (2.0, 9.0, 3.0)],
            "llamacpp-q4_0": [run("llamacpp-q4_0", s) for s in (1.0, 3.0, 3.0)]}
    text = first_token.table(runs, Namespace(shape="1b", threads=2, reps=3))
    assert "| llama3_raw int4 | 2.00 | 3.00 (2.00–9.00) | 1.00 |" in text
    assert "| llama3_raw int4 vs llama.cpp Q4_0 | 2.00× |" in text  # ratios 2, 3, 1: median 2 (medians: 1.0×)
