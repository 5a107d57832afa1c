"""Hostile and broken inputs (issue 12): a checkpoint folder never makes a tool read outside it, hang, exhaust
memory or leave half-written files; every number a flag takes is range-checked; nothing converts silently.

Through the command line where it is about the command line: exit 2, exactly one `error:` line naming the
file or flag, no traceback, within a time bound. "Nothing outside the folder was opened" is proven with
FIFOs: opening one for reading blocks until a writer comes, so a tool that opened it would hang and hit
the subprocess timeout instead of exiting 2. Those, and the refusals that a regression would turn into a hang
or an exhausted memory, run as real processes (run_tool); the others in this process (the `cli` fixture).
"""

import errno
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama3_raw.tokenizer as tokenizer_module
from helpers import OFFICIAL_TOKENIZER, TINY_GQA, python_m, random_state_dict, write_checkpoint, write_sharded_checkpoint
from llama3_raw import UserError, load_checkpoint, train, train_tokenizer
from llama3_raw.checkpoints import quantized as quantized_module
from llama3_raw.checkpoints import load_model, open_folder
from llama3_raw.checkpoints.shards import merge_shards
from llama3_raw.checkpoints.meta import read_state_dict
from llama3_raw.files import atomic_write, read_json
from llama3_raw.params import params_from_dict
from llama3_raw.tools import compare, score
from llama3_raw.training.state import read_log
from test_cli import REPO, tree_digest

HF_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 128256, "intermediate_size": 192, "rms_norm_eps": 1e-5}
TIME_BOUND_S = 60  # every refusal here is a matter of seconds; a hang would run into this


def run_tool(*args, module: str | None = None, timeout: float = TIME_BOUND_S, cwd=REPO):
    command = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "run.py")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def assert_refused(result, *fragments):
    """Exit 2, no traceback, exactly one error line, which holds every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def hf_folder(tmp: Path, weight_map: dict) -> Path:
    """A Hugging Face folder whose index says `weight_map`; its own model-00001 file is an empty placeholder."""
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "tokenizer.model").write_bytes(OFFICIAL_TOKENIZER.read_bytes())
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


# ---- 1. a Hugging Face index, or a symlink, pointing outside the folder ----

HANGS = pytest.mark.slow  # a real process with a time bound: opening the FIFO (or reading /dev/zero) would hang


@pytest.mark.parametrize("entry", [pytest.param("relative", marks=HANGS), pytest.param("absolute", marks=HANGS),
                                   "etc_passwd", pytest.param("symlink", marks=HANGS)])
def test_index_entries_outside_the_folder_are_refused_unopened(tmp_path, entry, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = fifo(outside / "model-00002-of-00002.safetensors")  # opening it would hang
    name = {"relative": "../outside/model-00002-of-00002.safetensors", "absolute": str(target),
            "etc_passwd": "../" * 12 + "etc/passwd", "symlink": "model-00002-of-00002.safetensors"}[entry]
    folder = hf_folder(tmp_path, {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                  "model.norm.weight": name})
    if entry == "symlink":
        (folder / name).symlink_to(target)
    runner = cli if entry == "etc_passwd" else run_tool  # only /etc/passwd can be opened without hanging
    result = runner("--ckpt-dir", folder, "--max-new-tokens", 1)
    named_by = "" if entry == "symlink" else "model.safetensors.index.json entry"  # the folder's own file: found first
    assert_refused(result, "outside the checkpoint folder", named_by,
                   "passwd" if entry == "etc_passwd" else "model-00002-of-00002.safetensors")


def test_a_weight_file_symlinked_out_of_the_folder_is_refused(tmp_path, cli):
    state = random_state_dict(TINY_GQA, seed=5)
    elsewhere = write_checkpoint(tmp_path / "elsewhere", TINY_GQA, state)
    folder = write_checkpoint(tmp_path / "folder", TINY_GQA, state)
    (folder / "consolidated.00.pth").unlink()
    (folder / "consolidated.00.pth").symlink_to(elsewhere / "consolidated.00.pth")
    result = cli("--ckpt-dir", folder, "--max-new-tokens", 1)
    assert_refused(result, "consolidated.00.pth resolves to", "outside the checkpoint folder")


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    from llama3_raw.checkpoints.safety import folder_file_size
    snapshot = tmp_path / "models--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--x" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1234").write_bytes(b"12345")
    (snapshot / "model.safetensors").symlink_to(blobs / "1234")
    assert folder_file_size(snapshot, snapshot / "model.safetensors") == 5


# ---- 2. files that are not regular files ----

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("good"), TINY_GQA, random_state_dict(TINY_GQA, seed=4))


@pytest.mark.parametrize("name, kind", [
    pytest.param("consolidated.00.pth", "fifo", marks=HANGS), ("consolidated.00.pth", "folder"),
    pytest.param("consolidated.00.pth", "dev_zero", marks=HANGS), ("params.json", "folder"),
    pytest.param("params.json", "fifo", marks=HANGS), pytest.param("tokenizer.model", "fifo", marks=HANGS),
    pytest.param("generation.json", "fifo", marks=HANGS), pytest.param("model.int8.pth", "fifo", marks=HANGS),
    pytest.param("model.int4.pth", "fifo", marks=HANGS)])
def test_files_that_are_not_regular_files_are_refused_before_opening(tmp_path, good_checkpoint, name, kind, cli):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in good_checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / name).unlink(missing_ok=True)
    if kind == "fifo":
        fifo(folder / name)
    elif kind == "folder":
        (folder / name).mkdir()
    else:
        (folder / name).symlink_to("/dev/zero")
    runner = cli if kind == "folder" else run_tool  # a folder cannot hang a tool that opens it; the others could
    result = runner("--ckpt-dir", folder, "--max-new-tokens", 1)
    expected = {"fifo": "is a pipe, not a regular file", "folder": "is a folder, not a regular file",
                "dev_zero": "outside the checkpoint folder"}[kind]
    assert_refused(result, name, expected)


@HANGS
def test_a_tokenizer_flag_naming_a_fifo_is_refused(tmp_path, good_checkpoint):
    result = run_tool("--ckpt-dir", good_checkpoint, "--tokenizer", fifo(tmp_path / "tok.model"))
    assert_refused(result, "--tokenizer", "is a pipe")


# ---- 3. sizes trusted before they are checked ----

@pytest.mark.slow  # a real process: a regression would run out of memory (it did)
def test_params_with_a_billion_layers_is_refused_at_once(tmp_path, good_checkpoint):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in good_checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "params.json").write_text(json.dumps(dict(TINY_GQA, n_layers=10**9)))
    start = time.perf_counter()
    result = run_tool("--ckpt-dir", folder, "--max-new-tokens", 1)
    assert_refused(result, "params.json describes a model of", "the weight files hold")
    assert time.perf_counter() - start < 30  # the shape table alone took 35 s and then ran out of memory


@pytest.mark.slow  # a real process: a regression would allocate the full tensor
def test_shards_with_a_huge_dim_are_refused_before_the_merge_allocates(tmp_path, monkeypatch):
    folder = write_sharded_checkpoint(tmp_path / "shards", TINY_GQA, random_state_dict(TINY_GQA, seed=6), 2)
    (folder / "params.json").write_text(json.dumps(dict(TINY_GQA, dim=10**9)))
    result = run_tool("--ckpt-dir", folder, "--max-new-tokens", 1)
    assert_refused(result, "params.json describes a model of")
    # The merge itself compares each slice with params before it allocates the full tensor.
    allocated = []
    real_empty = torch.empty

    def recording_empty(shape, **kwargs):
        allocated.append(math.prod(shape) if isinstance(shape, (tuple, list)) else shape)
        return real_empty(shape, **kwargs)

    monkeypatch.setattr(torch, "empty", recording_empty)
    huge = params_from_dict(dict(TINY_GQA, dim=2**20))  # its embedding alone would be 2**20 x 128256
    with pytest.raises(UserError, match="does not fit shard 0"):
        merge_shards(sorted(folder.glob("consolidated.*.pth")), huge, read_state_dict, show_progress=False)
    assert max(allocated, default=0) < 10**6


# ---- 4. remote tokenizers: bounded in time ----

@pytest.mark.slow  # a real process with a time bound, and a lookup that waits for the network
def test_a_remote_tokenizer_that_cannot_be_reached_is_refused_in_bounded_time(good_checkpoint, cli):
    start = time.perf_counter()
    result = run_tool("--ckpt-dir", good_checkpoint, "--tokenizer", "gs://nonexistent-bucket/tokenizer.model",
                      timeout=TIME_BOUND_S)
    assert_refused(result, "--tokenizer gs://nonexistent-bucket/tokenizer.model could not be read")
    assert time.perf_counter() - start < tokenizer_module.REMOTE_TIMEOUT_S + 30  # python + torch start included
    assert f"{tokenizer_module.REMOTE_TIMEOUT_S} s" in cli("--help").stdout


def test_a_silent_web_server_gets_the_time_bound(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "REMOTE_TIMEOUT_S", 1)
    with socket.socket() as server:  # accepts the connection (the kernel does), never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.perf_counter()
        with pytest.raises(UserError, match="could not be read"):
            tokenizer_module.load_tokenizer(f"http://127.0.0.1:{server.getsockname()[1]}/tokenizer.model")
        assert time.perf_counter() - start < 10


# ---- 5. writes that fail half-way ----

def test_save_quantized_below_a_file_is_refused_before_loading(tmp_path, good_checkpoint, cli):
    (tmp_path / "afile").write_text("keep me")
    before = tree_digest(tmp_path)
    result = cli("--ckpt-dir", good_checkpoint, "--quantize", "int8", "--save-quantized", tmp_path / "afile" / "q8")
    assert_refused(result, "--save-quantized", "afile is a file, not a folder")
    assert "loaded" not in result.stderr and tree_digest(tmp_path) == before


def test_save_quantized_without_room_is_refused_before_loading(tmp_path, good_checkpoint, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    loaded = []
    monkeypatch.setattr("llama3_raw.checkpoints.folder.load_checkpoint", lambda *a, **k: loaded.append(a))
    with pytest.raises(UserError, match=r"--save-quantized .* needs about \d+ MB but its disk has 1,000 bytes free"):
        load_model(open_folder(good_checkpoint), quantize="int8", save_quantized=tmp_path / "q8", show_progress=False)
    assert loaded == [] and list(tmp_path.iterdir()) == []


def full_disk_save(tmp_path, good_checkpoint, monkeypatch, destination_parent: Path):
    """--save-quantized where the disk fills up during the save; returns the UserError."""
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("Usage", (), {"free": 1 << 40})())  # it looks empty
    with pytest.raises(UserError) as info:
        load_model(open_folder(good_checkpoint), quantize="int8", save_quantized=destination_parent / "sub" / "q8",
                   show_progress=False)
    return str(info.value)


def test_a_save_that_fills_the_disk_leaves_nothing(tmp_path, good_checkpoint, monkeypatch):
    real_save = torch.save

    def save_until_full(obj, path):  # writes part of the file, then the disk is full
        real_save({"part": torch.zeros(1000)}, path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantized_module.torch, "save", save_until_full)
    message = full_disk_save(tmp_path, good_checkpoint, monkeypatch, tmp_path)
    assert "no space left on the disk (it needs about" in message
    assert list(tmp_path.iterdir()) == []  # not even the parent folders it made


def test_a_save_onto_a_real_full_tmpfs_leaves_nothing(tmp_path, good_checkpoint, monkeypatch):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        message = full_disk_save(tmp_path, good_checkpoint, monkeypatch, mount)
        assert "no space left on the disk" in message and list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_atomic_writes_turn_a_full_disk_into_one_sentence(tmp_path):
    (tmp_path / "old.bin").write_bytes(b"old")

    def fill(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="no space left"):
        atomic_write(tmp_path / "old.bin", fill)
    assert [p.name for p in tmp_path.iterdir()] == ["old.bin"] and (tmp_path / "old.bin").read_bytes() == b"old"


def test_training_out_below_a_file_is_refused_at_once(tmp_path, cli):
    (tmp_path / "afile").write_text("keep me")
    result = cli("--out", tmp_path / "afile" / "run", entry=train.main)
    assert_refused(result, "--out", "afile is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


# ---- 6. numbers out of range ----

def test_a_seed_beyond_64_bits_is_one_sentence(good_checkpoint, cli):
    result = cli("--ckpt-dir", good_checkpoint, "--seed", "1180591620717411303424", "--temperature", "1")
    assert_refused(result, "--seed", "2**63-1")


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_weights_that_are_not_finite_are_one_sentence(tmp_path, temperature, cli):
    """A NaN weight makes NaN logits: greedy decoding printed NUL bytes and sampling died in torch.multinomial."""
    state = random_state_dict(TINY_GQA, seed=21)
    state["layers.1.feed_forward.w2.weight"][3, 5] = float("nan")
    ckpt_dir = write_checkpoint(tmp_path / "nan", TINY_GQA, state, tokenizer=OFFICIAL_TOKENIZER)
    result = cli("--ckpt-dir", ckpt_dir, "--temperature", temperature, "--seed", "1", "--max-new-tokens", "3")
    assert_refused(result, "NaN or infinite", "replace the checkpoint with an intact copy")


def run_parser():
    from llama3_raw.cli.options import add_run_arguments, source_for
    from llama3_raw.errors import ArgumentParser

    parser = ArgumentParser(prog="run.py")
    add_run_arguments(parser, source_for([]))
    return parser


def tool_parser(tool):
    from llama3_raw.errors import ArgumentParser

    parser = ArgumentParser(prog=tool.__name__)
    tool.add_arguments(parser)
    return parser


@pytest.mark.parametrize("parser, argv, flag", [
    (run_parser, ["--seed", "-1"], "--seed"),
    (run_parser, ["--threads", str(10**30)], "--threads"),
    (run_parser, ["--threads", "0"], "--threads"),
    (run_parser, ["--temperature", "1e-320"], "--temperature"),
    (run_parser, ["--top-k", str(2**64)], "--top-k"),
    (run_parser, ["--max-new-tokens", str(2**64)], "--max-new-tokens"),
    (run_parser, ["--context-len", "0"], "--context-len"),
    (run_parser, ["--top-p", "nan"], "--top-p"),
    (lambda: tool_parser(score), ["f.txt", "--window", "0"], "--window"),
    (lambda: tool_parser(score), ["f.txt", "--stride", "-3"], "--stride"),
    (lambda: tool_parser(score), ["f.txt", "--tail", "2"], "--tail"),
    (lambda: tool_parser(compare), ["--tolerance", "nan"], "--tolerance"),
    (lambda: train.build_parser(), ["--stop-after", "0"], "--stop-after"),
    (lambda: train.build_parser(), ["--threads", str(10**30)], "--threads"),
])
def test_every_numeric_flag_is_range_checked(parser, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag} ") and "is not a" in errors[0]


def test_train_tokenizer_vocab_size_is_range_checked(capsys):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", "x", "--vocab-size", str(10**30), "--output", "y"])
    assert "--vocab-size 1000000000000000000000000000000 is not a positive integer" in capsys.readouterr().err


# ---- 7. a torn line in train_log.jsonl ----

def test_a_torn_last_log_line_is_dropped_with_a_notice(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"kind": "train", "step": 10}\n{"kind": "val", "step": 20}\n{"kind": "tra')
    assert read_log(log, 100) == [{"kind": "train", "step": 10}, {"kind": "val", "step": 20}]
    assert "dropped the torn last line 3" in capsys.readouterr().err


def test_a_torn_line_elsewhere_is_refused(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"kind": "train", "step": 10}\n{"kind": "tr\n{"kind": "val", "step": 20}\n')
    with pytest.raises(UserError, match="line 2 is not a log record"):
        read_log(log, 100)


# ---- 8. conversions are said ----

def test_mixed_shard_dtypes_are_noted(tmp_path, capsys):
    folder = write_sharded_checkpoint(tmp_path / "mixed", TINY_GQA, random_state_dict(TINY_GQA, seed=7), 2)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    torch.save({k: v.float() for k, v in shard.items()}, folder / "consolidated.01.pth")
    load_checkpoint(folder, show_progress=False)
    assert "consolidated.01.pth holds float32 tensors, converted to shard 00's bfloat16" in capsys.readouterr().err


def test_a_float16_checkpoint_is_noted(tmp_path, cli):
    folder = write_checkpoint(tmp_path / "fp16", TINY_GQA, random_state_dict(TINY_GQA, seed=8, dtype=torch.float16))
    result = cli("--ckpt-dir", folder, "--max-new-tokens", 1, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "float16 tensor(s), converted to float32" in result.stderr


# ---- further classes found on the way ----

@pytest.mark.parametrize("text, fragment", [('{"dim": NaN}', "holds NaN"), ('{"dim": Infinity}', "holds Infinity"),
                                            ("[" * 100000 + "]" * 100000, "nested too deeply")])
def test_json_that_python_reads_but_json_forbids_is_refused(tmp_path, text, fragment):
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(UserError, match=fragment):
        read_json(tmp_path / "params.json", "fix it")


def test_a_tokenizer_of_gigabytes_is_refused_unread(tmp_path):
    huge = tmp_path / "tokenizer.model"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used, but reading it would take 3 GB of memory
    with pytest.raises(UserError, match="too big for a tokenizer"):
        tokenizer_module.load_tokenizer(huge)


def test_inspect_layers_range_is_checked_before_it_is_expanded():
    from llama3_raw.tools.inspection import parse_layers
    with pytest.raises(UserError, match="outside 0..1"):
        parse_layers("0-99999999999999", 2)


@pytest.mark.parametrize("module, args, flag", [
    ("llama3_raw.train_tokenizer", ["--input", "afile", "--vocab-size", "300", "--output", "afile/tok.model"], "--output"),
    ("llama3_raw", ["inspect", "--out", "afile/views"], "--out"),
])
def test_other_outputs_below_a_file_are_refused_before_the_work(tmp_path, good_checkpoint, module, args, flag, cli):
    (tmp_path / "afile").write_text("some text to learn from")
    extra = ["--ckpt-dir", good_checkpoint] if args[0] == "inspect" else []
    entry = {"llama3_raw.train_tokenizer": train_tokenizer.main, "llama3_raw": python_m}[module]
    result = cli(*args, *extra, entry=entry, cwd=tmp_path)
    assert_refused(result, flag, "afile is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
