"""What a new user meets first (issue 14): help that names where defaults come from, subcommands with their
own help, flag errors in one line for every tool, threads, the seed of a sampled run, honest notes on stderr,
and a training run that says how it stopped. Run as a person runs them, each main() with an argument list in this
process (the `run` fixture below); Ctrl-C, which needs a process to signal, in a real one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_GQA, TINY_RECIPE, python_m, run_py, write_random_checkpoint
from llama3_raw import train, train_tokenizer
from llama3_raw.threads import SMALL_MODEL_PARAMETERS, default_threads, usable_cores, use_threads
from llama3_raw.tools.pictures import visible

REPO = Path(__file__).resolve().parent.parent
SHIPPED_GENERATION = json.loads((REPO / "weights" / "shakespeare" / "generation.json").read_text())


ENTRIES = {None: run_py, "llama3_raw": python_m, "llama3_raw.train": train.main,
           "llama3_raw.train_tokenizer": train_tokenizer.main}


@pytest.fixture
def run(cli):
    """`run(*args, module=MODULE)`: `python -m MODULE ARGS` (module None: `python run.py ARGS`), in this process, in the
    clone's folder as a person who cloned it runs them."""
    def run(*args, module: str | None = "llama3_raw", cwd=REPO):
        return cli(*args, entry=ENTRIES[module], cwd=cwd)

    return run


def test_help_names_the_source_of_every_default_and_shows_examples(run):
    result = run("--help", module=None)
    assert result.returncode == 0 and result.stdout.startswith("usage: run.py")
    text = " ".join(result.stdout.split())  # argparse wraps lines; compare the words
    assert (f"default {SHIPPED_GENERATION['max_new_tokens']}, from the checkpoint's generation.json; built-in 32"
            in text)
    assert f"default {SHIPPED_GENERATION['temperature']}, from the checkpoint's generation.json; built-in 0.0" in text
    assert "shipped/shakespeare/generation.json sets" in text and "examples:" in result.stdout


def test_help_for_a_checkpoint_without_generation_json_says_built_in(gqa_checkpoint, run):
    ckpt_dir, _, _ = gqa_checkpoint
    text = " ".join(run("--ckpt-dir", ckpt_dir, "--help", module=None).stdout.split())
    assert "tokens to generate at most (default 32, built-in)" in text and "has no generation.json" in text


def test_version(run):
    result = run("--version")
    assert result.returncode == 0 and re.fullmatch(r"llama3_raw \d+\.\d+\.\d+\n", result.stdout)


def test_top_level_help_lists_the_commands_and_each_has_its_own(run):
    top = run("--help")
    assert top.returncode == 0
    for command in ("run", "chat", "inspect", "compare", "score"):
        assert re.search(rf"^\s+{command}\s+\S", top.stdout, re.MULTILINE), command
        own = run(command, "--help")
        assert own.returncode == 0 and own.stdout.startswith(f"usage: python -m llama3_raw {command} "), command
    assert "--message" in run("chat", "--help").stdout and "--window" in run("score", "--help").stdout


def test_chat_subcommand_answers_like_run_py_chat(gqa_checkpoint, run):
    ckpt_dir, _, _ = gqa_checkpoint
    args = ("--ckpt-dir", ckpt_dir, "--message", "Hi", "--max-new-tokens", 4, "--json")
    via_subcommand = json.loads(run("chat", *args).stdout)
    via_flag = json.loads(run("--chat", *args, module=None).stdout)
    assert via_subcommand["tokens"] == via_flag["tokens"] and len(via_flag["tokens"]) > 0


@pytest.mark.parametrize("module, args, fragment", [
    (None, ["--temperature", "abc"], "--temperature abc is not a temperature of 0 (greedy)"),
    (None, ["Once", "upon", "a", "time"], "upon a time: more words than this command takes; put a prompt"),
    ("llama3_raw", ["chat", "--top-k", "-2"], "--top-k -2 is not a non-negative integer"),
    ("llama3_raw", ["inspect", "--dtype", "float16"], "--dtype float16 is not one of"),
    ("llama3_raw", ["score"], "FILE is required"),
    ("llama3_raw", ["score", "x.txt", "--threads", "0"], "--threads 0 is not a thread count (1 to 1024)"),
    ("llama3_raw", ["compare", "--tolerance", "tiny"], "--tolerance tiny is not a non-negative number"),
    ("llama3_raw", ["inspect", "--frobnicate"], "--frobnicate is not a flag here"),
    ("llama3_raw.train", ["--stop-after", "0"], "--stop-after 0 is not a positive integer"),
    ("llama3_raw.train", ["--threads", "many"], "--threads many is not a thread count (1 to 1024)"),
    ("llama3_raw.train_tokenizer", ["--input", "x"], "--output is required"),
])
def test_every_tool_says_a_flag_error_in_one_line_without_usage(module, args, fragment, run):
    result = run(*args, module=module)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and fragment in result.stderr
    assert "usage:" not in result.stderr and "--help" in result.stderr and result.stdout == ""


def test_thread_rule_and_flag(gqa_checkpoint, run):
    assert default_threads(SMALL_MODEL_PARAMETERS - 1) == 1  # the shipped 5M model: one thread
    assert 1 <= default_threads(SMALL_MODEL_PARAMETERS) <= usable_cores()
    before = torch.get_num_threads()
    try:
        assert use_threads(3, 10) == 3 and torch.get_num_threads() == 3  # --threads wins over the rule
    finally:
        torch.set_num_threads(before)
    ckpt_dir, _, _ = gqa_checkpoint  # 16M parameters (its vocabulary is Llama 3's): under the threshold
    args = ("--ckpt-dir", ckpt_dir, "--max-new-tokens", 2, "--json")
    assert json.loads(run(*args, module=None).stdout)["stats"]["threads"] == 1
    assert json.loads(run(*args, "--threads", 2, module=None).stdout)["stats"]["threads"] == 2


def test_an_unseeded_sampled_run_says_its_seed_and_the_seed_repeats_it(gqa_checkpoint, run):
    ckpt_dir, _, _ = gqa_checkpoint
    args = ("Once", "--ckpt-dir", ckpt_dir, "--max-new-tokens", 6, "--temperature", 1.0, "--json")
    first = run(*args, module=None)
    seed = json.loads(first.stdout)["stats"]["seed"]
    assert isinstance(seed, int) and f"--seed {seed}" in first.stderr
    again = run(*args, "--seed", seed, module=None)
    assert json.loads(again.stdout)["tokens"] == json.loads(first.stdout)["tokens"]
    assert "--seed" not in again.stderr  # a given seed needs no reminder
    greedy = run("Once", "--ckpt-dir", ckpt_dir, "--max-new-tokens", 2, "--json", module=None)
    assert json.loads(greedy.stdout)["stats"]["seed"] is None  # greedy draws nothing


def test_an_empty_prompt_says_it_starts_from_begin_of_text_and_counts_in_the_singular(gqa_checkpoint, run):
    ckpt_dir, _, _ = gqa_checkpoint
    result = run("", "--ckpt-dir", ckpt_dir, "--max-new-tokens", 1, module=None)
    assert result.returncode == 0, result.stderr
    assert "<|begin_of_text|>" in result.stderr
    assert "[1 prompt token, " in result.stderr and "; 1 new token, " in result.stderr


def test_chat_with_the_shipped_base_model_warns_and_an_unmarked_checkpoint_does_not(gqa_checkpoint, run):
    assert SHIPPED_GENERATION["instruct"] is False
    shipped = run("chat", "--message", "Hi", "--max-new-tokens", 3)
    assert shipped.returncode == 0 and "is a base model, not an Instruct one" in shipped.stderr
    ckpt_dir, _, _ = gqa_checkpoint
    unmarked = run("chat", "--ckpt-dir", ckpt_dir, "--message", "Hi", "--max-new-tokens", 3)
    assert unmarked.returncode == 0 and "base model" not in unmarked.stderr


def test_generation_json_instruct_must_be_true_or_false(tmp_path, run):
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", TINY_GQA, seed=3)
    (ckpt_dir / "generation.json").write_text('{"instruct": "no"}')
    result = run("--ckpt-dir", ckpt_dir, module=None)
    assert result.returncode == 2 and "instruct: 'no'" in result.stderr


def test_leading_spaces_are_visible_in_picture_labels():
    assert visible(" I") == "␣I" and visible("  to") == "␣␣to" and visible("A b") == "A b"


LONG_TINY_RECIPE = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": 100000}}  # stopped long before the end


@pytest.fixture()
def tiny_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(LONG_TINY_RECIPE))
    return ["--config", recipe, "--corpus", corpus, "--out", tmp_path / "out", "--no-progress"], tmp_path / "out"


def test_training_says_how_it_stopped_where_the_state_is_and_how_to_resume(tiny_training, run):
    args, out = tiny_training
    stopped = run(*args, "--stop-after", 5, module="llama3_raw.train")
    assert stopped.returncode == 0, stopped.stderr
    assert "training stopped as asked (--stop-after) at step 5 of 100000." in stopped.stderr
    assert f"state: {out / 'train_state.pt'}" in stopped.stderr and (out / "train_state.pt").is_file()
    assert "runnable model: none yet; the first is exported at step 10" in stopped.stderr
    resume = re.search(r"^resume: python -m llama3_raw.train (.*)$", stopped.stderr, re.MULTILINE).group(1).split()
    assert "--resume" in resume
    resumed = run(*resume, "--stop-after", 10, "--no-progress", module="llama3_raw.train")
    assert resumed.returncode == 0, resumed.stderr
    assert f"runnable model: {out} holds the model of step 10" in resumed.stderr
    assert (out / "consolidated.00.pth").is_file()


@pytest.mark.slow  # a real process to signal, and a training run until it is
def test_ctrl_c_saves_the_state_and_says_how_to_resume(tiny_training):
    args, out = tiny_training
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "llama3_raw.train", *map(str, args)], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "train_log.jsonl").is_file() or (out / "train_log.jsonl").read_text().count('"kind": "train"') < 2:
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    step = int(re.search(r"training interrupted \(Ctrl-C\) at step (\d+) of 100000\.", stderr).group(1))
    assert step >= 20 and (out / "train_state.pt").is_file() and "resume: python -m llama3_raw.train" in stderr
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == step  # the state saved is the step the message names
