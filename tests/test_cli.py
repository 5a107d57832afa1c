"""The command line as a person runs it: exit codes, stdout/stderr, files left alone. In this process (the `cli`
fixture, helpers.call), but for one real `python -m llama3_raw`, the module form."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_raw.errors import UserError

from helpers import FORTY_TWO_PROMPT, TINY_GQA, random_state_dict, write_checkpoint, write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=REPO, module=False):
    """A real process: `python run.py ARGS`, or `python -m llama3_raw ARGS` with module=True."""
    command = [sys.executable, "-m", "llama3_raw"] if module else [sys.executable, str(REPO / "run.py")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_json_output(gqa_checkpoint, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    result = cli("--ckpt-dir", ckpt_dir, "--max-new-tokens", 6, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    assert out["prompt_tokens"][:3] == [128000, 1820, 4320] and len(out["prompt_tokens"]) == 17
    assert len(out["tokens"]) == 6 and all(isinstance(t, int) for t in out["tokens"])
    assert isinstance(out["text"], str) and out["text"]
    assert set(out["stats"]) >= {"load_s", "prefill_s", "decode_tok_per_s", "peak_rss_mb"}
    assert out["stats"]["peak_rss_mb"] > 0 and out["stats"]["decode_tok_per_s"] > 0


def test_streams_prompt_and_completion_and_module_form_agrees(gqa_checkpoint, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    plain = cli("--ckpt-dir", ckpt_dir, "--max-new-tokens", 5)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(FORTY_TWO_PROMPT)
    as_json = json.loads(run_cli("--ckpt-dir", ckpt_dir, "--max-new-tokens", 5, "--json", module=True).stdout)
    assert plain.stdout == FORTY_TWO_PROMPT + as_json["text"] + "\n"  # greedy: both runs pick the same tokens
    assert "loaded" in plain.stderr


def test_seed_repeats_sampling(gqa_checkpoint, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    args = ("Once upon a time", "--ckpt-dir", ckpt_dir, "--max-new-tokens", 8, "--temperature", 1.0, "--json")
    a = json.loads(cli(*args, "--seed", 1).stdout)["tokens"]
    b = json.loads(cli(*args, "--seed", 1).stdout)["tokens"]
    c = json.loads(cli(*args, "--seed", 2, "--top-k", 5).stdout)["tokens"]
    assert a == b and a != c


@pytest.fixture(scope="module")
def bad_setups(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    good = write_random_checkpoint(tmp / "good", TINY_GQA, seed=4)
    small_vocab = dict(TINY_GQA, vocab_size=1000)
    mismatch = write_checkpoint(tmp / "vocab", small_vocab, random_state_dict(small_vocab))
    not_bpe = tmp / "not_bpe.model"
    not_bpe.write_text("hello world\n")
    broken = write_random_checkpoint(tmp / "broken", TINY_GQA, seed=4)
    data = (broken / "consolidated.00.pth").read_bytes()
    (broken / "consolidated.00.pth").write_bytes(data[:1000])
    return tmp, good, mismatch, not_bpe, broken


@pytest.mark.parametrize("case", [
    "missing dir", "truncated", "vocab mismatch", "not bpe", "missing tokenizer", "long prompt", "cuda",
    "temperature", "top-p", "max-new-tokens", "dtype", "unknown flag", "bad generation.json", "flag without value",
    "ckpt-dir is a file", "only params.json",
])
def test_bad_input_exits_2_with_one_sentence(bad_setups, case, cli):
    tmp, good, mismatch, not_bpe, broken = bad_setups
    before = tree_digest(tmp)
    args, fragment = {
        "missing dir": (["--ckpt-dir", tmp / "nope"], "does not exist"),
        "truncated": (["--ckpt-dir", broken], "truncated or corrupt"),
        "vocab mismatch": (["--ckpt-dir", mismatch], "vocab_size 1000"),
        "not bpe": (["--ckpt-dir", good, "--tokenizer", not_bpe], "not a tiktoken BPE"),
        "missing tokenizer": (["--ckpt-dir", good, "--tokenizer", tmp / "none.model"], "--tokenizer"),
        "long prompt": ([" word" * 8200, "--ckpt-dir", good], "context holds 8192"),
        "cuda": (["--ckpt-dir", good, "--device", "cuda"], "--device cuda"),
        "temperature": (["--ckpt-dir", good, "--temperature", "hot"], "--temperature hot is not a temperature of 0 (greedy) or at least 1e-06"),
        "top-p": (["--ckpt-dir", good, "--top-p", "1.5"], "--top-p 1.5 is not a probability in (0, 1]"),
        "max-new-tokens": (["--ckpt-dir", good, "--max-new-tokens", "-1"], "--max-new-tokens -1 is not a positive integer"),
        "dtype": (["--ckpt-dir", good, "--dtype", "float16"], "--dtype float16 is not one of 'auto', 'float32'"),
        "unknown flag": (["--ckpt-dir", good, "--frobnicate"], "--frobnicate is not a flag here"),
        "flag without value": (["--ckpt-dir"], "--ckpt-dir needs a value"),
        "ckpt-dir is a file": (["--ckpt-dir", good / "params.json"], "params.json is a file, not a folder"),
        "only params.json": (["--ckpt-dir", tmp / "only_params"], "lacks consolidated.00.pth and tokenizer.model"),
        "bad generation.json": (["--ckpt-dir", tmp], ""),
    }[case]
    if case == "bad generation.json":
        gen_dir = tmp / "gen"
        if not gen_dir.exists():
            write_random_checkpoint(gen_dir, TINY_GQA, seed=4)
            (gen_dir / "generation.json").write_text('{"temperature": "warm"}')
            before = tree_digest(tmp)
        args, fragment = ["--ckpt-dir", gen_dir], "generation.json"
    if case == "only params.json" and not (tmp / "only_params").exists():
        (tmp / "only_params").mkdir()
        (tmp / "only_params" / "params.json").write_bytes((good / "params.json").read_bytes())
        before = tree_digest(tmp)
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert "usage:" not in result.stderr  # the usage block is for --help, not for every mistake
    assert result.stdout == ""
    assert tree_digest(tmp) == before  # nothing on disk changed


def test_no_checkpoint_says_where_it_looked_and_what_to_download(tmp_path, monkeypatch, capsys):
    from llama3_raw import cli
    from llama3_raw.checkpoints import places

    monkeypatch.setattr(places, "SHIPPED_MODEL", tmp_path / "no_shipped_model")
    monkeypatch.setattr(places, "CLONE_WEIGHTS_DIR", tmp_path / "no_clone")
    monkeypatch.delenv("LLAMA3_RAW_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "Meta-Llama-3-8B" in err and "./weights/" in err and "LLAMA3_RAW_WEIGHTS" in err and "--ckpt-dir" in err
    assert "site-packages" not in err and len(err.strip().splitlines()) == 1


def test_official_weights_are_found_in_the_env_folder_then_in_dot_weights(tmp_path, monkeypatch):
    from llama3_raw.checkpoints import find_default_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLAMA3_RAW_WEIGHTS", raising=False)
    in_cwd = write_random_checkpoint(tmp_path / "weights" / "Meta-Llama-3-8B", TINY_GQA, tokenizer=None)
    assert find_default_checkpoint().resolve() == in_cwd.resolve()
    elsewhere = write_random_checkpoint(tmp_path / "mine" / "A-Llama", TINY_GQA, tokenizer=None)
    monkeypatch.setenv("LLAMA3_RAW_WEIGHTS", str(tmp_path / "mine"))
    assert find_default_checkpoint() == elsewhere
    monkeypatch.setenv("LLAMA3_RAW_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="LLAMA3_RAW_WEIGHTS=.*is not a folder"):
        find_default_checkpoint()


def test_official_checkpoint_under_weights_wins_over_the_shipped_model(tmp_path):
    from llama3_raw.checkpoints import find_default_checkpoint

    shipped = write_random_checkpoint(tmp_path / "shipped", TINY_GQA, tokenizer=None)
    weights = tmp_path / "weights"
    weights.mkdir()
    assert find_default_checkpoint([weights], shipped) == shipped
    official = write_random_checkpoint(weights / "Meta-Llama-3-8B" / "original", TINY_GQA, tokenizer=None)
    assert find_default_checkpoint([weights], shipped) == official
