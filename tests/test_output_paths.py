"""Every output path a command writes (inspect --out, run/chat --save-quantized, train --out, train_tokenizer
--output) that cannot be written is refused before the work: exit 2, one `error:` line naming the flag and
the path, no traceback, and nothing on disk changed: no folder made, no probe file left behind.

In-process: each command's main() with an argument list; stdout and stderr captured.
"""

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from llama3_raw import train, train_tokenizer
from llama3_raw.cli import main as cli_main
from llama3_raw.errors import UserError
from llama3_raw.files import check_writable_folder, try_writing_in, write_failure, write_text
from helpers import call
from test_cli import tree_digest

LINUX_PROC = Path("/proc/self").is_dir()
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def sysfs_refuses() -> bool:
    try:
        os.mkdir("/sys/llama3_raw_probe")
    except OSError:
        return os.path.isdir("/sys")
    os.rmdir("/sys/llama3_raw_probe")
    return False


def bad_paths(tmp_path: Path) -> dict[str, Path]:
    """Name -> a path no command can write a folder (or a file) at; built inside tmp_path where it can be."""
    tmp_path.mkdir()
    (tmp_path / "afile").write_text("keep me")
    paths = {"below a file": tmp_path / "afile" / "out", "an existing file": tmp_path / "afile",
             "name too long": tmp_path / ("x" * 300), "below a name too long": tmp_path / ("x" * 300) / "out",
             "deep below a file": tmp_path / "afile" / "a" / "b"}
    if LINUX_PROC:
        paths |= {"in /proc": Path("/proc/llama3_raw_out"), "deep in /proc": Path("/proc/llama3_raw_out/a/b")}
    if sysfs_refuses():
        paths["in /sys"] = Path("/sys/llama3_raw_out")
    if not AS_ROOT:  # root writes into any folder whatever its mode bits say
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        paths["read-only folder"] = locked / "out"
    return paths


@contextlib.contextmanager
def read_only_mount(folder: Path):
    """`folder` as a read-only file system (EROFS, which stops root too), or a skip where mounting needs root."""
    folder.mkdir()
    if not AS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                     capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


COMMANDS = {  # name -> (main, argv for an output path, the flag that names it)
    "inspect --out": (cli_main, lambda ckpt, out: ["inspect", "--ckpt-dir", str(ckpt), "--out", str(out)], "--out"),
    "run --save-quantized": (cli_main, lambda ckpt, out: ["run", "x", "--ckpt-dir", str(ckpt), "--quantize", "int8",
                                                          "--save-quantized", str(out)], "--save-quantized"),
    "chat --save-quantized": (cli_main, lambda ckpt, out: ["chat", "--message", "hi", "--ckpt-dir", str(ckpt),
                                                           "--quantize", "int4", "--save-quantized", str(out)],
                              "--save-quantized"),
    "train --out": (train.main, lambda ckpt, out: ["--out", str(out), "--stop-after", "1"], "--out"),
    "train_tokenizer --output": (train_tokenizer.main, lambda ckpt, out: [
        "--input", str(Path(ckpt) / "params.json"), "--vocab-size", "260", "--output", str(out / "tok.model")], "--output"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_that_cannot_be_written_is_one_sentence_before_the_work(command, gqa_checkpoint, tmp_path, capsys):
    main, argv_for, flag = COMMANDS[command]
    paths = bad_paths(tmp_path / "place")
    if command == "train_tokenizer --output":
        paths.pop("an existing file")  # below it: the same case as "below a file"
    before = tree_digest(tmp_path)
    for name, out in paths.items():
        code, stdout, stderr = call(main, argv_for(gqa_checkpoint[0], out), capsys)
        lines = stderr.strip().splitlines()
        assert code == 2, (name, stderr)
        assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith(f"error: {flag} "), (name, stderr)
        assert str(out) in lines[0], (name, stderr)
        assert "loaded" not in stderr and stdout == "", (name, stdout)  # refused before any weights or learning
        assert tree_digest(tmp_path) == before, name
        assert not any(p.name.startswith(".write-check") for p in tmp_path.rglob("*")), name
    assert not Path("/proc/llama3_raw_out").exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_on_a_read_only_file_system_is_one_sentence(command, gqa_checkpoint, tmp_path, capsys):
    main, argv_for, flag = COMMANDS[command]
    with read_only_mount(tmp_path / "ro") as folder:
        code, stdout, stderr = call(main, argv_for(gqa_checkpoint[0], folder / "out"), capsys)
        assert code == 2 and stdout == "" and list(folder.iterdir()) == []
        assert stderr.startswith(f"error: {flag} {folder / 'out'}") and "(read-only file system); choose a folder " \
            "you can write to." in stderr and stderr.count("\n") == 1, stderr


def test_the_sentences_say_why_and_what_to_do(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(UserError, match=r"^--out .*afile/x cannot be created: .*afile is a file, not a folder; "
                                        r"choose another path\.$"):
        check_writable_folder(tmp_path / "afile" / "x", "--out")
    if LINUX_PROC:
        with pytest.raises(UserError, match=r"^--out /proc/x cannot be written \(this file system does not take new "
                                            r"files\); choose a folder you can write to\.$"):
            check_writable_folder(Path("/proc/x"), "--out")


def test_writing_a_file_onto_a_folder_names_the_folder_and_leaves_it_alone(tmp_path):
    folder = tmp_path / "tok.model"
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(UserError, match=r"tok.model failed: it is a folder; nothing was left behind, name a file"):
        write_text(folder, "merges")
    assert [p.name for p in tmp_path.rglob("*")] == ["tok.model", "inside"]
    assert "it is a folder" in str(write_failure(folder, IsADirectoryError(errno.EISDIR, "Is a directory")))


def test_the_write_check_makes_missing_folders_and_removes_them_again(tmp_path):
    check_writable_folder(tmp_path / "a" / "b" / "c", "--out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    try_writing_in(tmp_path / "kept")  # an existing folder stays, empty
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_a_missing_parent_is_made_for_a_real_inspect(gqa_checkpoint, tmp_path, capsys):
    out = tmp_path / "new" / "views"
    code, stdout, stderr = call(cli_main, ["inspect", "--ckpt-dir", str(gqa_checkpoint[0]), "--out", str(out),
                                           "--layers", "0", "hi"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer_00.png", "logit_lens.md", "logit_lens.png",
                                                     "shapes.txt"]


def test_a_tokenizer_output_that_is_a_folder_is_refused_before_the_learning(tmp_path, capsys, monkeypatch):
    from llama3_raw.training import bpe
    (tmp_path / "tok.model" / "inside").mkdir(parents=True)
    (tmp_path / "text.txt").write_text("to be or not to be " * 50)
    monkeypatch.setattr(bpe, "learn_bpe", lambda *a: pytest.fail("learned before the output was checked"))
    code, stdout, stderr = call(train_tokenizer.main, ["--input", str(tmp_path / "text.txt"), "--vocab-size", "260",
                                                      "--output", str(tmp_path / "tok.model")], capsys)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith(f"error: --output {tmp_path / 'tok.model'} is a folder; name the file to write")
    assert [p.name for p in (tmp_path / "tok.model").iterdir()] == ["inside"]
