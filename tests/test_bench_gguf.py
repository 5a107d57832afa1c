"""bench/gguf_rows.py, this project reading llama.cpp's GGUF files in the benchmark: the rows run right after
llama.cpp on the same file, load through the library as run.py does (Q4_0 blocks kept as int4), and a worker
measures them; none of it needs llama.cpp (the tiny files here are written by the gguf package)."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from test_gguf import Q, TINY, write_gguf  # noqa: E402
from helpers import random_state_dict  # noqa: E402
from llama3_raw.checkpoints.gguf_file import read_gguf  # noqa: E402
from llama3_raw.checkpoints.gguf_quants import as_int4, file_tensor  # noqa: E402
from llama3_raw.cli.commands import build_parser  # noqa: E402
from llama3_raw.quantize import Int4Weight  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import bench.__main__ as bench_main  # noqa: E402
from bench import first_token, gguf_rows, llamacpp  # noqa: E402


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory) -> Path:
    state = random_state_dict(TINY, seed=5, dtype=torch.float32)
    return write_gguf(tmp_path_factory.mktemp("bench_gguf") / "q4_0.gguf", state, matrix_type=Q.Q4_0)


def test_each_gguf_row_runs_right_after_llama_cpp_on_the_same_file():
    assert bench_main.rep_order(["ours", "ours-int8", "ours-int4", "llamacpp", "gguf"], "bfloat16", "bfloat16") == [
        "ours", "llamacpp-bf16", "ours-gguf-bf16", "ours-int8", "llamacpp-q8_0", "ours-gguf-int8",
        "ours-int4", "llamacpp-q4_0", "ours-gguf-int4", "llamacpp-q4_k_m"]
    assert bench_main.rep_order(["ours", "ours-gguf-int4"], "bfloat16", "bfloat16") == ["ours", "ours-gguf-int4"]
    args = Namespace(threads=2, long_prompt=8, decode_steps=2)
    assert bench_main.impl_runs("ours-gguf-int4", "float32", args, Path("ckpt"), {}, {}) == []  # bf16 activations


def test_the_rows_flags_are_run_pys_and_mean_what_the_worker_loads():
    """The first-token rows run run.py with these flags; the bench rows call load_model with what they mean."""
    for impl in gguf_rows.ALL_WAYS:
        args = build_parser("run.py", ["run"]).parse_args(["run", *gguf_rows.run_flags(impl), "hello"])
        options = gguf_rows.load_options(impl)
        assert (args.quantize, args.gguf_int4 == "keep") == (options["quantize"], options["keep_gguf_int4"]), impl
    assert gguf_rows.load_options("ours-gguf-int4") == {"quantize": "int4", "keep_gguf_int4": True}
    assert gguf_rows.load_options("ours-gguf-int4-requantize")["keep_gguf_int4"] is False
    ggufs = {impl: Path(f"{kind.lower()}.gguf") for impl, kind in llamacpp.WIDTHS.items()}
    assert gguf_rows.gguf_file("ours-gguf-bf16-int4", ggufs).name == "bf16.gguf"
    command = first_token.command("ours-gguf-int4-requantize", Path("q4_0.gguf"), 2)
    assert command[-5:] == ["--quantize", "int4", "--gguf-int4", "requantize", first_token.PROMPT]


def test_q4_0_rows_keep_the_files_blocks_and_the_requantized_do_not(q4_gguf):
    """Kept: every Q4_0 matrix is the file's blocks as int4 (gguf_quants.as_int4), value for value."""
    kept, _, file_bytes = gguf_rows.load_gguf("ours-gguf-int4", q4_gguf, "bfloat16", "cpu")
    again, _, _ = gguf_rows.load_gguf("ours-gguf-int4-requantize", q4_gguf, "bfloat16", "cpu")
    file = read_gguf(q4_gguf)
    blocks = as_int4(file_tensor(file.mapping, file.tensors["blk.1.ffn_down.weight"]))
    ours, requantized = kept["layers.1.feed_forward.w2.weight"], again["layers.1.feed_forward.w2.weight"]
    assert isinstance(ours, Int4Weight) and isinstance(requantized, Int4Weight) and file_bytes == q4_gguf.stat().st_size
    scales = blocks.scales_and_zeros.to(torch.bfloat16)  # the block scales in the compute dtype
    assert torch.equal(ours.plain(), blocks.plain()) and torch.equal(ours.scales_and_zeros, scales)
    assert not torch.equal(requantized.plain(), blocks.plain())


@pytest.mark.slow  # a worker process: Python and torch start-up
def test_a_worker_measures_this_project_on_a_gguf(q4_gguf):
    result = subprocess.run([sys.executable, "-m", "bench.worker", "--impl", "ours-gguf-int4", "--dtype", "bfloat16",
                             "--ckpt", str(q4_gguf), "--threads", "1", "--long-prompt", "8", "--decode-steps", "2"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout.splitlines()[-1])
    matrices = sum(v.numel() for k, v in random_state_dict(TINY, seed=5).items() if k.endswith("weight") and v.ndim == 2
                   and k != "tok_embeddings.weight")
    # int4 in groups of 32: half a byte a weight plus a bf16 scale and offset per 32 (5 bits); norms in bf16
    assert matrices * 0.5 < run["bytes_per_token"] < matrices * 0.75
    assert run["file_bytes"] == q4_gguf.stat().st_size and run["decode_tok_s"] > 0 and run["load_s"] > 0
