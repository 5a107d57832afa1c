"""Training that grows with its user (issue 16): data-parallel ranks (gloo, 127.0.0.1, one thread per rank)
against one process, resuming under another number of ranks, rank 0 alone writing, a killed rank ending the
others, dropout (off in evaluation and generation; 0 gives exactly the losses training gave before it existed),
samples at every evaluation, and CUDA where a GPU is present.

Oracle for the ranks: the same recipe in one process with the same global batch (itself checked against Meta's
loss in test_train.py); the ranks must match it to fp32 rounding, step by step and weight by weight.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_tensor_parallel import free_port
from test_train import TINY_RECIPE, assert_user_error, read_log, small_corpus, train_tiny, write_recipe  # noqa: F401 (a fixture)
from llama3_raw import train as llama3_train
from llama3_raw.errors import UserError
from llama3_raw.generate import Sampling, generate
from llama3_raw.parallel import Ranks, wait_for_peers
from llama3_raw.tokenizer import tokenizer_from_bytes
from llama3_raw.training import load_recipe, train
from llama3_raw.training.data_parallel import check_batch_shares, rows_of_rank
from llama3_raw.training.dropout import forward_with, row_dropout
from llama3_raw.training.objective import validation_nll, validation_windows
from llama3_raw.training.state import STATE_FILE

REPO = Path(__file__).resolve().parent.parent
RANKS_TIMEOUT_S = 120  # a spawned group that has not finished by then has hung: the test fails, the ranks are killed
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# The tiny recipe's logged losses (nats/token) in one process with one thread, as the training loop gave them at
# commit 1fb3dc4, before dropout existed, on an AMD EPYC: ("train" | "val", step) -> loss. Another CPU sums float32
# in another order (an Intel Xeon with AMX gave these to within 1e-8 relative); any dropout at all moves them by
# far more (test_dropout_trains_and_is_off_in_evaluation_and_sampling: dropout 0.3 changes the loss at step 10).
LOSSES_BEFORE_DROPOUT = {("train", 10): 6.026864051818848, ("val", 10): 5.532891750335693,
                         ("train", 20): 5.380710172653198, ("val", 20): 5.243173738938875}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_corpus) -> Path:
    """The tiny recipe in one process, one thread: the run the ranks must follow."""
    return train_tiny(tmp_path_factory.mktemp("one"), small_corpus, threads=1)


def rank_worker(rank: int, world_size: int, port: int, recipe: str, corpus: str, outs: list[str], kwargs: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    train(load_recipe(Path(recipe), Path(corpus)), Path(outs[rank]), show_progress=False, threads=1,
          ranks=Ranks(rank, world_size), **kwargs)
    # Leave together, as the command line's ranks do (parallel.as_one_of): rank 1, done first while rank 0 still
    # samples and saves, once aborted here ("terminate called without an active exception") on leaving alone.
    wait_for_peers(Ranks(rank, world_size), timeout_s=60)
    dist.destroy_process_group()


def spawn_ranks(world_size: int, recipe: Path, corpus: Path, outs: list[Path], **kwargs) -> None:
    context = mp.start_processes(rank_worker, args=(world_size, free_port(), str(recipe), str(corpus),
                                                    list(map(str, outs)), kwargs),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {RANKS_TIMEOUT_S} s")


def losses(out: Path) -> dict:
    return {(r["kind"], r["step"]): r["nats_per_token"] for r in read_log(out) if r["kind"] in ("train", "val")}


def assert_same_trajectory(ranked: Path, alone: Path) -> None:
    """The same logged losses and final weights and optimizer moments, to fp32 rounding."""
    ranked_losses, alone_losses = losses(ranked), losses(alone)
    assert ranked_losses.keys() == alone_losses.keys()
    for key, loss in alone_losses.items():
        assert ranked_losses[key] == pytest.approx(loss, rel=1e-6, abs=0), key
    ranked_state, alone_state = (torch.load(out / STATE_FILE, weights_only=True) for out in (ranked, alone))
    assert ranked_state["step"] == alone_state["step"]
    for key, weight in alone_state["weights"].items():
        torch.testing.assert_close(ranked_state["weights"][key], weight, rtol=1e-4, atol=1e-6, msg=key)
    for slot, moments in alone_state["optimizer"]["state"].items():
        torch.testing.assert_close(ranked_state["optimizer"]["state"][slot]["exp_avg_sq"], moments["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-10)


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_two_ranks_follow_one_process_and_only_rank_zero_writes(one_process, small_corpus, tmp_path):
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    out, rank_one_out = tmp_path / "out", tmp_path / "rank1_out"  # each rank gets its own --out here
    spawn_ranks(2, recipe, small_corpus, [out, rank_one_out])
    assert not rank_one_out.exists()  # rank 1 wrote nothing (it would have created its --out)
    assert_same_trajectory(out, one_process)
    log = read_log(out)
    assert [r["world_size"] for r in log if r["kind"] == "train"] == [2, 2]
    assert [r["world_size"] for r in read_log(one_process) if r["kind"] == "train"] == [1, 1]
    assert len(log) == len({(r["kind"], r["step"]) for r in log})  # every line once: one writer
    assert not list(out.glob(".*partial"))


def torchrun_train(*args, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "llama3_raw.train", "--no-progress",
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=timeout)


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_a_two_rank_state_resumes_in_one_process(one_process, small_corpus, tmp_path):
    recipe, out = write_recipe(tmp_path, TINY_RECIPE), tmp_path / "out"
    ranked = torchrun_train("--config", recipe, "--corpus", small_corpus, "--out", out, "--stop-after", 13)
    assert ranked.returncode == 0, ranked.stderr
    assert ranked.stderr.count("2 ranks, 2 rows each") == 1  # rank 0 alone prints
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 13
    train(load_recipe(recipe, small_corpus), out, resume=True, show_progress=False, threads=1)
    assert_same_trajectory(out, one_process)
    assert [r["world_size"] for r in read_log(out) if r["kind"] == "train"] == [2, 1]


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_a_killed_rank_ends_the_others(small_corpus, tmp_path):
    """A rank that dies: the others fail at their next collective (gloo sees the closed connection) and torchrun
    ends the group, within 60 s here; a rank that hangs instead is given up after COLLECTIVE_TIMEOUT_S (120 s)."""
    long_recipe = write_recipe(tmp_path, {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": 100000,
                                                                    "eval_interval": 100000}})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "llama3_raw.train", "--no-progress", "--config",
               str(long_recipe), "--corpus", str(small_corpus), "--out", str(tmp_path / "out")]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    try:
        log, deadline = tmp_path / "out" / "train_log.jsonl", time.monotonic() + 90
        while not (log.exists() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.5)  # both ranks are training once rank 0 logs
        ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert len(ranks) == 2 and log.exists()
        rank_one = next(pid for pid in ranks if "RANK=1" in Path(f"/proc/{pid}/environ").read_text().split("\0"))
        os.kill(rank_one, signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.communicate(timeout=120)
        assert launcher.returncode != 0 and time.monotonic() - killed_at < 60
        assert not Path(f"/proc/{ranks[0]}").exists() or "zombie" in Path(f"/proc/{ranks[0]}/status").read_text().lower()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()


@pytest.mark.slow  # ranks: processes, each starting Python and torch
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_saves(small_corpus, tmp_path):
    """SIGTERM reaches ranks at different moments (here: only rank 1). They agree at each step's end, so
    all stop after the same one: rank 0 saves it and says so in one line, and each rank exits 143."""
    long_recipe = write_recipe(tmp_path, {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": 100000,
                                                                    "eval_interval": 100000}})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "llama3_raw.train", "--no-progress", "--config",
               str(long_recipe), "--corpus", str(small_corpus), "--out", str(out)]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)
    try:
        log, deadline = out / "train_log.jsonl", time.monotonic() + 90
        while not (log.exists() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.5)  # both ranks are training once rank 0 logs
        ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        rank_one = next(pid for pid in ranks if "RANK=1" in Path(f"/proc/{pid}/environ").read_text().split("\0"))
        os.kill(rank_one, signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    lines = [line for line in stderr.splitlines() if line.startswith("training stopped by SIGTERM after step ")]
    assert len(lines) == 1, stderr  # rank 0 alone says it
    step = int(lines[0].split("after step ")[1].split()[0])
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == step
    assert "exitcode  : 143" in stderr  # torchrun's summary of the ranks (with its own traceback, not a rank's)
    assert not [line for line in stderr.splitlines() if line.strip().startswith("File") and "llama3_raw" in line]


def test_global_batch_rows_are_shared_out_and_too_many_ranks_are_refused():
    assert [list(rows_of_rank(5, Ranks(r, 2))) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [len(rows_of_rank(16, Ranks(r, 3))) for r in range(3)] == [5, 5, 6]
    with pytest.raises(UserError, match="batch_size 4 is the global batch"):
        check_batch_shares(4, Ranks(0, 5), Path("r.json"))


def test_dropout_zero_gives_the_losses_of_before(one_process):
    got = losses(one_process)
    assert got.keys() == LOSSES_BEFORE_DROPOUT.keys()
    for key, loss in LOSSES_BEFORE_DROPOUT.items():
        assert got[key] == pytest.approx(loss, rel=1e-6, abs=0), key


def test_dropout_masks_belong_to_global_rows():
    x = torch.ones(4, 8, 16)
    whole = row_dropout(0.25, seed=7, step=3, rows=range(0, 4))
    half = row_dropout(0.25, seed=7, step=3, rows=range(2, 4))
    first, second = whole(x), whole(x)  # two places in the model: two different masks per row
    assert torch.equal(half(x[2:]), first[2:]) and torch.equal(half(x[2:]), second[2:])
    assert not torch.equal(first, second)
    assert first.unique().tolist() == torch.tensor([0.0, 1 / 0.75]).tolist()  # kept activations are scaled up
    assert abs((first == 0).float().mean().item() - 0.25) < 0.05
    assert row_dropout(0.0, seed=7, step=3, rows=range(4)) is None


def test_the_dropout_runs_where_nanogpt_puts_it_and_nowhere_else():
    """forward_with(dropout) is model.forward with the dropout at the embeddings and at each attention and
    feed-forward output before it joins the residual stream: 1 + 2 * n_layers calls, in that order."""
    from helpers import random_state_dict

    from llama3_raw import model
    from llama3_raw.params import params_from_dict
    raw = TINY_RECIPE["model"] | {"vocab_size": 64}
    params, weights = params_from_dict(raw), random_state_dict(raw, seed=3)
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    seen = []

    def counting(x):  # the identity, noting each place's tensor
        seen.append(x.clone())
        return x

    record = {}
    logits, _ = forward_with(counting)(weights, params, tokens)
    plain, _ = model.forward(weights, params, tokens, record=record)
    assert torch.equal(logits, plain)
    assert forward_with(None) is model.forward
    places = ["tok_embeddings"] + [f"layers.{i}.{part}" for i in range(params.n_layers)
                                   for part in ("attention", "feed_forward")]
    assert len(seen) == len(places)
    assert all(torch.equal(x, record[name]) for x, name in zip(seen, places))
    halved, _ = forward_with(lambda x: x / 2)(weights, params, tokens)
    assert not torch.allclose(halved, plain)  # a real dropout changes what the model computes


def test_dropout_trains_and_is_off_in_evaluation_and_sampling(one_process, small_corpus, tmp_path):
    generation = {"prompt": "ROMEO:\n", "max_new_tokens": 20, "temperature": 0.8, "top_k": 50, "top_p": 0.95}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "dropout": 0.3},
                                                 "generation": generation}), small_corpus)
    out = tmp_path / "out"
    train(recipe, out, show_progress=False, threads=1)
    assert losses(out)[("train", 10)] != losses(one_process)[("train", 10)]  # training did drop activations
    state = torch.load(out / STATE_FILE, weights_only=True)
    tokenizer = tokenizer_from_bytes(bytes(state["tokenizer"].numpy()))
    log = read_log(out)
    val = [r for r in log if r["kind"] == "val"][-1]
    text = small_corpus.read_text(encoding="utf-8")
    ids = tokenizer.encode(text[int(len(text) * 0.9):], bos=False)  # the validation split, whole
    windows = validation_windows(np.asarray(ids), recipe.train.context)
    nll = validation_nll(state["weights"], recipe.params, windows, tokenizer.bos_id, recipe.train.batch_size)
    assert val["full"] and val["nats_per_token"] == pytest.approx(nll / len(ids), rel=1e-9)
    params = replace(recipe.params, max_seq_len=recipe.train.context)
    sampled = generate(state["weights"], params, tokenizer.encode("ROMEO:\n", bos=True), 20, tokenizer.stop_ids,
                       Sampling(temperature=0.8, top_p=0.95, top_k=50, seed=recipe.train.seed))
    samples = [r for r in log if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [10, 20]
    assert samples[-1]["text"] == "ROMEO:\n" + tokenizer.decode(list(sampled))


def test_cuda_without_a_gpu_is_one_sentence(tmp_path, small_corpus, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_cuda_training runs instead")
    result = cli("--no-progress", "--device", "cuda", "--config", write_recipe(tmp_path, TINY_RECIPE), "--corpus",
                 small_corpus, "--out", tmp_path / "out", entry=llama3_train.main, cwd=REPO)
    assert_user_error(result, "--device cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training(one_process, small_corpus, tmp_path):
    """bf16 autocast on the GPU: fp32 weights and moments, and losses close to the CPU's fp32 ones."""
    out = tmp_path / "out"
    train(load_recipe(write_recipe(tmp_path, TINY_RECIPE), small_corpus), out, show_progress=False, device="cuda")
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert all(w.dtype == torch.float32 for w in state["weights"].values())
    for key, loss in losses(one_process).items():
        assert losses(out)[key] == pytest.approx(loss, rel=0.02), key


def test_a_state_saved_before_dropout_existed_still_resumes(one_process, small_corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(one_process, out)
    state = torch.load(out / STATE_FILE, weights_only=True)
    saved_recipe = json.loads(state["recipe"])
    del saved_recipe["train"]["dropout"]  # as train_state.pt files written before this option
    torch.save({**state, "recipe": json.dumps(saved_recipe)}, out / STATE_FILE)
    recipe = load_recipe(write_recipe(tmp_path, TINY_RECIPE), small_corpus)
    assert train(recipe, out, resume=True, show_progress=False, threads=1).step == 20
    with pytest.raises(UserError, match="different recipe"):  # a dropout it did not run with is still refused
        train(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "dropout": 0.1}}),
                          small_corpus), out, resume=True, show_progress=False, threads=1)
