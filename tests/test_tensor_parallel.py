"""Tensor-parallel ranks (torch.distributed, gloo, 127.0.0.1, one thread per rank) against one process and
against Meta's reference run as the same number of model-parallel ranks.

Oracles: Meta's `Transformer` (llama_models/llama3/model.py with fairscale's model-parallel layers), each
rank loading its own consolidated.NN.pth strictly, for the greedy tokens; this project's single-process
forward on the merged weights (itself checked against Meta's in test_reference.py) for the logits of the
prefill and of every cached decode step.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import TINY_GQA, TINY_MQA, random_state_dict, write_checkpoint, write_sharded_checkpoint
from llama3_raw import cast_weights, compiled, forward, load_checkpoint, new_kv_cache
from llama3_raw.parallel import Ranks

REPO = Path(__file__).resolve().parent.parent
PROMPT = [128000, 791, 4320, 311, 279, 17139, 3488, 374]
DECODE_STEPS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))


def greedy_run(weights, params, ranks=Ranks(), dtype=torch.float32) -> dict:
    """Prefill logits, then DECODE_STEPS greedy steps through the cache: every step's logits and token."""
    cache = new_kv_cache(params, 1, len(PROMPT) + DECODE_STEPS, dtype, ranks=ranks)
    with torch.inference_mode():
        logits, cache = forward(weights, params, torch.tensor([PROMPT]), cache, ranks=ranks)  # (1, S, V)
        out = {"prefill": logits, "steps": [], "tokens": []}
        for _ in range(DECODE_STEPS):
            token = int(logits[0, -1].argmax())
            out["tokens"].append(token)
            logits, cache = forward(weights, params, torch.tensor([[token]]), cache, ranks=ranks)
            out["steps"].append(logits)
    return out


def ours_worker(rank: int, world_size: int, port: int, ckpt_dir: str, out_path: str,
                dtype: torch.dtype = torch.float32) -> None:
    join(rank, world_size, port)
    ranks = Ranks(rank, world_size)
    ckpt = load_checkpoint(ckpt_dir, show_progress=False, ranks=ranks)
    result = greedy_run(cast_weights(ckpt.weights, dtype, "cpu"), ckpt.params, ranks, dtype)
    result["wk_rows"] = ckpt.weights["layers.0.attention.wk.weight"].shape[0]
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


def meta_worker(rank: int, world_size: int, port: int, ckpt_dir: str, p: dict, out_path: str) -> None:
    import fairscale.nn.model_parallel.initialize as fs_init
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    join(rank, world_size, port)
    fs_init.initialize_model_parallel(world_size)
    torch.set_default_dtype(torch.float32)
    model = Transformer(ModelArgs(max_seq_len=64, max_batch_size=1, **p))
    model.load_state_dict(torch.load(Path(ckpt_dir) / f"consolidated.{rank:02d}.pth", weights_only=True), strict=True)
    tokens, position = list(PROMPT), 0
    with torch.inference_mode():
        for _ in range(DECODE_STEPS):
            logits = model.forward(torch.tensor([tokens[position:]]), position)
            position = len(tokens)
            tokens.append(int(logits[0, -1].argmax()))
    if rank == 0:
        torch.save({"tokens": tokens[len(PROMPT):]}, out_path)
    dist.destroy_process_group()


def spawn(worker, world_size: int, *args) -> None:
    mp.start_processes(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True,
                       start_method="spawn")


def single_process(ckpt_dir: Path) -> dict:
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    return greedy_run(cast_weights(ckpt.weights, torch.float32, "cpu"), ckpt.params)


def assert_same_run(ranked: dict, alone: dict) -> None:
    assert ranked["tokens"] == alone["tokens"]
    torch.testing.assert_close(ranked["prefill"], alone["prefill"], rtol=0, atol=1e-5)
    for step, (a, b) in enumerate(zip(ranked["steps"], alone["steps"])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"decode step {step}")


@pytest.mark.slow  # ranks: processes, each starting Python and torch
@pytest.mark.parametrize("p, n_files, world_size", [
    (TINY_GQA, 2, 2),                       # a rank per file, mapped as it is
    (dict(TINY_GQA, n_kv_heads=4), 4, 4),   # 4 kv heads on 4 ranks
    (dict(TINY_GQA, n_kv_heads=4), 4, 2),   # 2 consecutive files merged per rank
    (TINY_GQA, 1, 2),                       # one file cut in 2 (8B on 2 GPUs)
    (TINY_GQA, 1, 4),                       # 2 kv heads on 4 ranks: each rank holds the kv head it reads
    (TINY_MQA, 1, 2),                       # multi-query: the one kv head on both ranks
])
def test_ranks_equal_one_process_at_every_step(tmp_path, p, n_files, world_size):
    state = random_state_dict(p, seed=11)
    ckpt_dir = write_sharded_checkpoint(tmp_path / "ckpt", p, state, n_files, tokenizer=None)
    spawn(ours_worker, world_size, str(ckpt_dir), str(tmp_path / "ours.pt"))
    ranked = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert_same_run(ranked, single_process(write_checkpoint(tmp_path / "whole", p, state, tokenizer=None)))
    head_dim = p["dim"] // p["n_heads"]
    assert ranked["wk_rows"] == head_dim * max(1, p["n_kv_heads"] // world_size)  # only the kv heads it reads


@pytest.mark.slow  # ranks: processes, each starting Python and torch
@pytest.mark.parametrize("p, world_size", [(TINY_GQA, 2), (dict(TINY_GQA, n_kv_heads=4), 4)])
def test_greedy_tokens_equal_metas_model_parallel_ranks(tmp_path, p, world_size):
    state = random_state_dict(p, seed=12)
    ckpt_dir = write_sharded_checkpoint(tmp_path / "ckpt", p, state, world_size, tokenizer=None)
    spawn(meta_worker, world_size, str(ckpt_dir), p, str(tmp_path / "meta.pt"))
    spawn(ours_worker, world_size, str(ckpt_dir), str(tmp_path / "ours.pt"))
    meta_tokens = torch.load(tmp_path / "meta.pt", weights_only=True)["tokens"]
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["tokens"] == meta_tokens


def duplicated_kv_files(tmp_path: Path, copies: int = 2) -> tuple[Path, dict, dict]:
    """405B's layout in small: the files declare copies x the real kv heads, each real head stored `copies`
    times in a row (one per rank that reads it), one file per declared kv head."""
    real = TINY_GQA  # 8 query heads, 2 kv heads
    state = random_state_dict(real, seed=13)
    head_dim = real["dim"] // real["n_heads"]
    declared = dict(real, n_kv_heads=real["n_kv_heads"] * copies)
    stored = dict(state)
    for key, tensor in state.items():
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = tensor.view(real["n_kv_heads"], 1, head_dim, -1)
            stored[key] = heads.expand(-1, copies, -1, -1).reshape(-1, real["dim"]).clone()
    ckpt_dir = write_sharded_checkpoint(tmp_path / "declared", declared, stored, declared["n_kv_heads"], tokenizer=None)
    return ckpt_dir, real, state


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_duplicated_kv_heads_are_kept_once_in_one_process_and_split_on_ranks(tmp_path):
    ckpt_dir, real, state = duplicated_kv_files(tmp_path)
    merged = load_checkpoint(ckpt_dir, show_progress=False)
    assert merged.params.n_kv_heads == real["n_kv_heads"]  # the cache holds each real head once
    for key in ("layers.0.attention.wk.weight", "layers.1.attention.wv.weight"):
        assert torch.equal(merged.weights[key], state[key])
    alone = single_process(write_checkpoint(tmp_path / "real", real, state, tokenizer=None))
    assert_same_run(greedy_run(cast_weights(merged.weights, torch.float32, "cpu"), merged.params), alone)
    spawn(ours_worker, 4, str(ckpt_dir), str(tmp_path / "ours.pt"))
    assert_same_run(torch.load(tmp_path / "ours.pt", weights_only=True), alone)


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_hugging_face_and_saved_int8_and_int4_folders_are_cut_per_rank(tmp_path, monkeypatch):
    from test_hf_checkpoint import hf_model

    # PyTorch's products on every side: where the compiled kernels apply to the whole matrix but not to a rank's
    # narrower part (int4: fewer than 64 inputs), the two would round activations differently (test_decode_kernels).
    monkeypatch.setenv(compiled.SWITCH_ENV, "0")

    hf_dir = tmp_path / "hf"
    hf_model(vocab_size=128256, seed=3).save_pretrained(hf_dir)
    spawn(ours_worker, 2, str(hf_dir), str(tmp_path / "hf.pt"))
    assert_same_run(torch.load(tmp_path / "hf.pt", weights_only=True), single_process(hf_dir))

    from llama3_raw.checkpoints import default_tokenizer_path
    from llama3_raw.checkpoints.quantized import save_quantized_checkpoint
    from llama3_raw.quantize import quantize_weights
    # FFN hidden size 256: each rank's 128 inputs of w2 are 4 int4 groups of 32; 4 kv heads: 16 rows of wk per rank
    p = dict(TINY_GQA, multiple_of=64, n_kv_heads=4)
    source = write_checkpoint(tmp_path / "bf16", p, random_state_dict(p, seed=15), tokenizer=None)
    (source / "tokenizer.model").write_text("")  # the saver copies it; nothing here reads it
    whole = load_checkpoint(source, show_progress=False)
    for scheme in ("int8", "int4"):  # int4: rows and whole groups of columns cut from the stored layout
        saved = save_quantized_checkpoint(quantize_weights(whole.weights, torch.bfloat16, scheme), whole.params, scheme,
                                          default_tokenizer_path(source), tmp_path / scheme)
        spawn(ours_worker, 2, str(saved), str(tmp_path / f"{scheme}.pt"), torch.bfloat16)
        ranked = torch.load(tmp_path / f"{scheme}.pt", weights_only=True)
        alone_ckpt = load_checkpoint(saved, show_progress=False)
        alone = greedy_run(cast_weights(alone_ckpt.weights, torch.bfloat16, "cpu"), alone_ckpt.params, dtype=torch.bfloat16)
        scale = alone["prefill"].abs().max()
        assert (ranked["prefill"] - alone["prefill"]).abs().max() <= 0.02 * scale  # bf16 partial sums, added in bf16


def test_int8_of_a_rank_slice_stays_within_one_step_of_the_merged_quantization():
    """--quantize int8 on ranks quantizes each rank's slice: a column-split wo/w2 gets one scale per row of the
    rank's part of each row, never larger than the whole row's, so each weight stays within half a step of it."""
    from llama3_raw.checkpoints.slicing import slice_whole
    from llama3_raw.params import params_from_dict
    from llama3_raw.quantize import dequantize, quantize_int8

    params = params_from_dict(TINY_GQA)
    state = {k: v.float() for k, v in random_state_dict(TINY_GQA, seed=16).items()}
    for key in ("layers.0.attention.wo.weight", "layers.1.feed_forward.w2.weight", "layers.0.attention.wq.weight"):
        merged = quantize_int8(state[key], torch.float32)
        for rank in range(2):
            part = slice_whole(state, params, Ranks(rank, 2))[key]
            ours = quantize_int8(part, torch.float32)
            merged_part = slice_whole({key: merged}, params, Ranks(rank, 2))[key]
            assert (ours.scales <= merged_part.scales).all()
            assert ((dequantize(ours) - part).abs() <= ours.scales[:, None] / 2 + 1e-7).all()
            assert ((dequantize(ours) - dequantize(merged_part)).abs() <= merged_part.scales[:, None] + 1e-7).all()


# ---- the command line under torchrun ----

def torchrun(*args, nproc: int = 2, extra=(), timeout: float = 180, monitor_s: float | None = None) -> subprocess.CompletedProcess:
    """`monitor_s`: how often torchrun looks at its workers. Its default (0.1 s) tears the other ranks down as soon
    as one has failed, so a test that wants to see each rank end on its own leaves them longer."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra,
               str(REPO / "run.py"), *map(str, args)]
    if not extra:
        command[3:3] = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if monitor_s is not None:
        command[3:3] = ["--monitor-interval", str(monitor_s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def cli_json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_cli")
    from helpers import OFFICIAL_TOKENIZER
    state = random_state_dict(TINY_GQA, seed=14)
    one = write_checkpoint(tmp / "one", TINY_GQA, state, tokenizer=OFFICIAL_TOKENIZER)
    two = write_sharded_checkpoint(tmp / "two", TINY_GQA, state, 2, tokenizer=OFFICIAL_TOKENIZER)
    return one, two


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_cli_under_torchrun_prints_once_and_matches_one_process(two_shards, cli):
    one, two = two_shards
    flags = ("--max-new-tokens", 6, "--dtype", "float32", "--json")
    alone = cli_json(cli("hello", "--ckpt-dir", one, *flags, cwd=REPO))
    ranked = torchrun("hello", "--ckpt-dir", two, *flags)
    out = cli_json(ranked)  # one JSON object: only rank 0 wrote to stdout
    assert out["tokens"] == alone["tokens"] and out["stats"]["world_size"] == 2 and alone["stats"]["world_size"] == 1
    assert ranked.stderr.count("loaded rank 0 of 2") == 1


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_two_machines_on_one_host_give_the_same_tokens(two_shards):
    _, two = two_shards
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        extra = ["--nnodes", "2", "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *extra, str(REPO / "run.py"),
                   "hello", "--ckpt-dir", str(two), "--max-new-tokens", "6", "--dtype", "float32", "--json"]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                      env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}))
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert outputs[1][0] == ""  # the second machine's rank is silent
    single = torchrun("hello", "--ckpt-dir", two, "--max-new-tokens", 6, "--dtype", "float32", "--json")
    assert json.loads(outputs[0][0])["tokens"] == cli_json(single)["tokens"]


def error_lines(result) -> list[str]:
    """The ranks' `error:` lines; no rank printed a traceback (torchrun's own summary of the failure names only
    its launcher's frames)."""
    frames = [line for line in result.stderr.splitlines() if line.strip().startswith('File "')]
    assert result.returncode != 0 and not [f for f in frames if str(REPO / "llama3_raw") in f or str(REPO / "run.py") in f], result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_ranks_that_do_not_divide_the_heads_are_refused_on_every_rank(two_shards):
    one, _ = two_shards
    # Every rank refuses by itself, before any rank waits for another: with torchrun watching only every 15 s,
    # no rank is torn down before it has said why (under the default 0.1 s a slow rank may be killed first).
    result = torchrun("--ckpt-dir", one, nproc=3, monitor_s=15)
    lines = error_lines(result)
    assert len(lines) == 3 and all("cannot be shared by 3 ranks" in line and "1, 2, 4, 8" in line for line in lines), \
        result.stderr  # all of it: which rank said what, and what torchrun did to the others


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_a_missing_shard_is_named_on_every_rank(tmp_path):
    from helpers import OFFICIAL_TOKENIZER
    ckpt_dir = write_sharded_checkpoint(tmp_path, dict(TINY_GQA, n_kv_heads=4),
                                        random_state_dict(dict(TINY_GQA, n_kv_heads=4)), 4, tokenizer=OFFICIAL_TOKENIZER)
    (ckpt_dir / "consolidated.02.pth").unlink()
    result = torchrun("--ckpt-dir", ckpt_dir, nproc=2, monitor_s=15)
    lines = error_lines(result)
    assert len(lines) == 2 and all("consolidated.02.pth is missing" in line for line in lines), result.stderr


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_a_rank_killed_mid_run_ends_the_others(two_shards):
    _, two = two_shards
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "run.py"), "hello", "--ckpt-dir", str(two),
               "--max-new-tokens", "100000", "--context-len", "8192", "--dtype", "float32"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    ranks = []
    deadline = time.monotonic() + 60
    while len(ranks) < 2 and time.monotonic() < deadline:  # the two rank processes, once they generate
        time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        ranks = [int(pid) for pid in children]
    time.sleep(3)
    os.kill(ranks[-1], signal.SIGKILL)
    started = time.monotonic()
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and time.monotonic() - started < 60
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.slow  # torchrun: a launcher and its ranks, each starting Python and torch
def test_a_stopped_rank_is_noticed_when_the_timeout_runs_out(two_shards):
    """SIGSTOP: the rank lives, its connections stay open, it says nothing. The other says so in one sentence
    when $LLAMA3_RAW_RANK_TIMEOUT_S runs out, and exits. (torchrun then gives the stopped rank 30 s to obey its
    SIGTERM before SIGKILL; here the test sends the SIGKILL itself once the sentence is there.)"""
    _, two = two_shards
    timeout_s = 5
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "run.py"), "hello", "--ckpt-dir", str(two),
               "--max-new-tokens", "100000", "--context-len", "8192", "--dtype", "float32"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                     "LLAMA3_RAW_RANK_TIMEOUT_S": str(timeout_s)})
    ranks, said = [], None
    watchdog = threading.Timer(90, launcher.kill)  # ends the stderr loop below if no rank ever gives up
    watchdog.start()
    try:
        assert launcher.stdout.read(len("hello")) == "hello"  # rank 0 prints the prompt once both generate
        ranks = sorted(int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                          text=True).stdout.split())
        os.kill(ranks[-1], signal.SIGSTOP)  # the later-started child: rank 1
        stopped = time.monotonic()
        for line in launcher.stderr:  # bounded: rank 0 ends when its timeout runs out, or the test's timeout ends it
            if "error:" in line:
                said, waited = line, time.monotonic() - stopped
                break
    finally:
        watchdog.cancel()
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.communicate(timeout=120)
    assert said is not None and f"another rank stopped or did not answer within {timeout_s} s" in said, said
    assert timeout_s - 1 < waited < timeout_s + 15, waited  # the timeout it names, not minutes later
    assert launcher.returncode != 0


@pytest.mark.slow  # a real rank that waits for its peer: environment variables, a process group, a time-out
def test_a_rendezvous_that_never_completes_ends_in_one_sentence(two_shards):
    """Rank 0 of 2 started alone (its peer never comes): it gives up after LLAMA3_RAW_RANK_TIMEOUT_S."""
    _, two = two_shards
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "LLAMA3_RAW_RANK_TIMEOUT_S": "3"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--ckpt-dir", str(two)], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert error_lines(result) == [line for line in result.stderr.splitlines() if "could not join" in line]
    assert "within 3 s" in result.stderr and result.returncode == 2
    env["LLAMA3_RAW_RANK_TIMEOUT_S"] = "soon"
    bad = subprocess.run([sys.executable, str(REPO / "run.py"), "--ckpt-dir", str(two)], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=120)
    assert error_lines(bad) and "LLAMA3_RAW_RANK_TIMEOUT_S='soon' is not a number of seconds" in bad.stderr
