"""Events while the work runs (issue 31): a closed stdout, a second writer on the same output, SIGTERM and
SIGHUP, and the thread count chosen from what the cores do now.

Each event is a real one sent to a real process (subprocess, bounded timeouts): a pipe whose reader has gone,
an OS lock held by another process, a signal from os.kill. The thread rule is tested with synthetic
/proc/stat samples, so that other work on the machine cannot change what the test sees.
"""

import itertools
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

from helpers import TINY_RECIPE
from llama3_raw import threads
from llama3_raw.locks import writing_alone
from test_cli import REPO

TIME_BOUND_S = 120
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
PROMPT_FILE_TEXT = "ROMEO:\nJULIET:\n"


def command(*args, module: str | None = None) -> list[str]:
    return [sys.executable, *(["-m", module] if module else [str(REPO / "run.py")]), *map(str, args)]


def with_closed_stdout(argv: list[str], close_stderr: bool = False, cwd=REPO) -> subprocess.CompletedProcess:
    """Run `argv` with a stdout (and, with close_stderr, a stderr) whose reader has already gone: its first
    write meets EPIPE, as `| head` does once head has read its lines and left."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = subprocess.Popen(argv, stdout=write_end, stderr=write_end if close_stderr else subprocess.PIPE,
                                   cwd=cwd, env=ENV, text=True)
    finally:
        os.close(write_end)
    _, stderr = process.communicate(timeout=TIME_BOUND_S)
    return subprocess.CompletedProcess(argv, process.returncode, "", stderr or "")


def assert_quiet_broken_pipe(result):
    assert result.returncode == 141, result.stderr  # 128 + SIGPIPE, as the shell reports `yes | head`'s yes
    for noise in ("Traceback", "BrokenPipeError", "Exception ignored", "error:"):
        assert noise not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


BROKEN_PIPE_COMMANDS = {  # every command that streams or prints results; the shipped model, a few tokens
    "run": lambda tmp, text: command("ROMEO:", "--max-new-tokens", 8),
    "run --json": lambda tmp, text: command("ROMEO:", "--max-new-tokens", 4, "--json"),
    "run --prompts-file": lambda tmp, text: command("--prompts-file", text.with_name("prompts.txt"), "--max-new-tokens", 4),
    "chat --message": lambda tmp, text: command("chat", "--message", "Hello", "--max-new-tokens", 4, module="llama3_raw"),
    "inspect": lambda tmp, text: command("inspect", "ROMEO:", "--out", tmp / "inspect", "--layers", "0",
                                         module="llama3_raw"),
    "score": lambda tmp, text: command("score", text, module="llama3_raw"),
    "compare": lambda tmp, text: command("compare", "ROMEO:", module="llama3_raw"),
    "bench.threads": lambda tmp, text: command("--models", "shipped", "--reps", 1, "--threads", 1, module="bench.threads"),
}


SLOW_PIPES = {"chat --message", "compare", "bench.threads", "run --prompts-file"}  # the same helper as the others


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_PIPES else name
                                  for name in BROKEN_PIPE_COMMANDS])
def test_a_closed_stdout_ends_every_printing_command_quietly_with_141(name, tmp_path, text_file):
    text_file.with_name("prompts.txt").write_text(PROMPT_FILE_TEXT)
    if name == "compare":
        pytest.importorskip("llama_models")
    result = with_closed_stdout(BROKEN_PIPE_COMMANDS[name](tmp_path, text_file))
    assert_quiet_broken_pipe(result)
    if name == "inspect":  # it had written its files before it printed: all whole, no temporary one left
        assert not list((tmp_path / "inspect").glob(".*partial"))


@pytest.mark.slow  # a training run until its first sample
def test_training_with_its_log_stream_gone_ends_with_141_and_leaves_nothing_half_written(tmp_path):
    recipe, corpus = tiny_recipe(tmp_path, steps=20)
    out = tmp_path / "out"
    # stdout and stderr (where the progress and the samples go) both lead to a pipe nobody reads any more
    result = with_closed_stdout(command("--config", recipe, "--corpus", corpus, "--out", out, "--no-progress",
                                        module="llama3_raw.train"), close_stderr=True)
    assert result.returncode == 141
    assert not out.exists() or not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def tiny_recipe(tmp_path: Path, steps: int = 100000) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "steps": steps}}))
    return recipe, corpus


def start_training(tmp_path: Path, *extra) -> tuple[subprocess.Popen, Path, list[str]]:
    recipe, corpus = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    args = ["--config", recipe, "--corpus", corpus, "--out", out, "--no-progress", *extra]
    process = subprocess.Popen(command(*args, module="llama3_raw.train"), cwd=REPO, env=ENV,
                               stderr=subprocess.PIPE, text=True)
    return process, out, args


def wait_for(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIME_BOUND_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{what} never happened: {process.communicate()[1]}")
        time.sleep(0.1)


def train_lines(out: Path) -> int:
    log = out / "train_log.jsonl"
    return log.read_text().count('"kind": "train"') if log.is_file() else 0


@pytest.mark.slow  # a real training run, until it is signalled
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_in_training_finishes_the_step_saves_says_so_in_one_line_and_exits_143(tmp_path, signum, code):
    process, out, _ = start_training(tmp_path)
    wait_for(process, lambda: train_lines(out) >= 2, "training")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=TIME_BOUND_S)
    assert process.returncode == code, stderr
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if name in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    match = re.fullmatch(rf"training stopped by {name} after step (\d+) of 100000, state saved to (\S+); "
                         rf"resume: python -m llama3_raw\.train .* --resume", lines[0])
    assert match, lines[0]
    step = int(match.group(1))
    assert step >= 20 and Path(match.group(2)) == out / "train_state.pt"
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == step  # the step the line names
    assert stderr.rstrip().endswith(lines[0])  # the last word: nothing after it
    assert not list(out.glob(".*partial"))


def test_a_second_trainer_on_the_same_out_is_refused_at_once_naming_the_first(tmp_path):
    first, out, args = start_training(tmp_path)
    try:
        wait_for(first, lambda: train_lines(out) >= 1, "the first training")
        before = (out / "train_log.jsonl").read_text()
        started = time.monotonic()
        second = subprocess.run(command(*args, module="llama3_raw.train"), cwd=REPO, env=ENV, capture_output=True,
                                text=True, timeout=TIME_BOUND_S)
        refused_in = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"error: --out {out} is being written by another process (pid {first.pid}: " in second.stderr
        assert refused_in < 30  # before learning a tokenizer, let alone training (Python and torch start in it)
        assert (out / "train_log.jsonl").read_text().startswith(before)  # the first run's log, untouched by the second
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TIME_BOUND_S)
    assert first.returncode == 143


@pytest.mark.slow  # two real training runs
def test_two_trainers_started_at_the_same_moment_one_runs_the_other_is_refused(tmp_path):
    recipe, corpus = tiny_recipe(tmp_path)
    out = tmp_path / "deeper" / "out"  # missing, with a missing parent: both make it at the same moment
    argv = command("--config", recipe, "--corpus", corpus, "--out", out, "--no-progress", module="llama3_raw.train")
    both = [subprocess.Popen(argv, cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + TIME_BOUND_S
        while all(p.poll() is None for p in both) and time.monotonic() < deadline:
            time.sleep(0.1)
        refused = next(p for p in both if p.poll() is not None)
        running = next(p for p in both if p is not refused)
        stderr = refused.communicate(timeout=TIME_BOUND_S)[1]
        assert refused.returncode == 2, stderr
        assert f"error: --out {out} is being written by another process (pid {running.pid}: " in stderr
        wait_for(running, lambda: train_lines(out) >= 2, "the training that holds --out")
    finally:
        for process in both:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.communicate(timeout=TIME_BOUND_S)
    assert running.returncode == 143


@pytest.mark.slow  # a real training run, until it is signalled
def test_a_trainer_killed_with_sigkill_leaves_no_lock_that_blocks_resume(tmp_path):
    process, out, args = start_training(tmp_path)
    wait_for(process, lambda: (out / "train_state.pt").is_file(), "the first saved state")
    process.kill()  # SIGKILL: nothing runs in the process; the kernel drops its lock
    process.communicate(timeout=TIME_BOUND_S)
    step = torch.load(out / "train_state.pt", weights_only=True)["step"]
    resumed = subprocess.run(command(*args, "--resume", "--stop-after", step + 2, module="llama3_raw.train"), cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=TIME_BOUND_S)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped as asked (--stop-after) at step {step + 2} of 100000" in resumed.stderr


@pytest.mark.parametrize("writer", ["inspect --out", "train_tokenizer --output"])
def test_other_writers_are_refused_while_another_process_holds_their_output(tmp_path, writer, text_file):
    """This test's process holds the output (as a first command would); the real second command is refused."""
    if writer == "inspect --out":
        target, folder, flag = tmp_path / "views", True, "--out"
        argv = command("inspect", "ROMEO:", "--out", target, "--layers", "0", module="llama3_raw")
    else:
        target, folder, flag = tmp_path / "tok" / "tokenizer.model", False, "--output"
        argv = command("--input", text_file, "--vocab-size", 300, "--output", target, module="llama3_raw.train_tokenizer")
    with writing_alone(target, flag, folder=folder):
        refused = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIME_BOUND_S)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"error: {flag} {target} is being written by another process (pid {os.getpid()}: " in refused.stderr
    assert not target.exists() or (folder and not any(target.iterdir()))  # nothing written by the refused one
    assert not list(tmp_path.rglob("*.lock"))  # the hold left nothing behind once let go
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIME_BOUND_S)
    assert done.returncode == 0, done.stderr  # and once let go, the output is free again


def test_a_lock_held_by_a_process_that_died_is_free(tmp_path):
    """The lock dies with its process: a holder killed with SIGKILL leaves the folder free at once."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llama3_raw.locks import writing_alone\n"
                               f"with writing_alone({str(tmp_path / 'out')!r}, '--out'):\n"
                               "    print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(Exception, match=f"pid {holder.pid}"):
        with writing_alone(tmp_path / "out", "--out"):
            pass
    holder.kill()
    holder.communicate(timeout=TIME_BOUND_S)
    with writing_alone(tmp_path / "out", "--out"):
        pass


@pytest.mark.slow  # several runs of inspect, each signalled at another moment
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_inspect_signalled_at_any_moment_ends_at_once_and_leaves_no_half_written_file(tmp_path, signum):
    out = tmp_path / "views"
    name = signal.Signals(signum).name
    for delay in (1.0, 2.0, 3.0, 4.0):
        process = subprocess.Popen(command("inspect", "ROMEO: the king", "--out", out, module="llama3_raw"),
                                   cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=TIME_BOUND_S)
        # before Python has set its handlers (while it imports) the signal's default action ends it: -signum;
        # after, one line and 128 + signum; a run that finished before the signal came: 0
        assert process.returncode in (-signum, 128 + signum, 0), stderr
        assert "Traceback" not in stderr, stderr
        if process.returncode == 128 + signum:
            assert stderr.rstrip().endswith(f"interrupted ({name})"), stderr
        if out.exists():
            assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
            for png in out.glob("*.png"):
                assert png.read_bytes().endswith(b"IEND\xaeB`\x82"), png  # whole: a PNG ends with its IEND chunk


def test_sigterm_while_run_generates_ends_in_one_line_with_143(tmp_path):
    process = subprocess.Popen(command("ROMEO:", "--max-new-tokens", 100000, "--temperature", 0.8), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.read(len("ROMEO:")) == "ROMEO:"  # generating now
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIME_BOUND_S)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("interrupted (SIGTERM)"), stderr


# The thread rule, on synthetic /proc/stat samples: "cpuN user nice system idle iowait irq softirq steal".
def stat_text(*cores: tuple[int, int]) -> str:
    """A /proc/stat with one line per core, each (busy ticks, idle ticks)."""
    lines = [f"cpu {sum(b for b, _ in cores)} 0 0 {sum(i for _, i in cores)} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in enumerate(cores)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"


def test_busy_cores_counts_what_the_sample_saw_busy_less_this_process():
    before = stat_text((1000, 5000), (1000, 5000))
    one_busy = stat_text((1010, 5000), (1000, 5010))  # core 0 busy all 10 ticks, core 1 idle
    assert threads.busy_between(before, one_busy, {0, 1}) == pytest.approx(1.0)
    assert threads.busy_between(before, one_busy, {1}) == pytest.approx(0.0)  # outside the affinity: not ours to count
    # the busy core was this process itself, for all of the 0.1 s: no other work
    assert threads.busy_between(before, one_busy, {0, 1}, own_cpu_s=0.1, wall_s=0.1) == pytest.approx(0.0)
    steal = "cpu0 1000 0 0 5000 0 0 0 10 0 0\ncpu1 1000 0 0 5010 0 0 0 0 0 0\n"  # the hypervisor took core 0
    assert threads.busy_between(stat_text((1000, 5000), (1000, 5000)), steal, {0, 1}) == pytest.approx(1.0)


def test_recent_heavy_work_that_has_ended_leaves_every_core_to_the_default(monkeypatch):
    """The case the load average got wrong: a heavy run (two cores busy for minutes) has just ended. Its load
    average still says 2; the sample, taken now, sees both cores idle, and the default takes both."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "usable_cpus", lambda: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 1.5, 0.8), raising=False)  # what it used to read
    since_boot = stat_text((500_000, 10_000), (500_000, 10_000))  # mostly busy until now
    now = stat_text((500_000, 10_010), (500_001, 10_009))  # the 0.1 s just sampled: idle
    samples = itertools.cycle([since_boot, now])  # each sample: a reading before, and one after
    monkeypatch.setattr(threads, "read_proc_stat", lambda: next(samples))
    assert threads.idle_cores() == 2
    assert threads.default_threads(1_000_000_000) == 2  # a 1B model on 2 idle cores: both
    assert threads.default_threads(5_000_000) == 1  # the small-model protection stays


@pytest.mark.parametrize("busy, idle", [(0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (1.4, 1), (2.0, 1)])
def test_work_running_now_takes_its_cores_from_the_default(monkeypatch, busy, idle):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.idle_cores(busy) == idle


def test_a_process_busy_during_the_sample_is_seen(monkeypatch):
    """A real busy process, running through the real 0.1 s sample of /proc/stat, counts as (about) a core."""
    if threads.read_proc_stat() is None:
        pytest.skip("no /proc/stat here")
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert threads.busy_cores(0.3) >= 0.6  # ~1 core, less when other work leaves it part of one
    finally:
        spinner.kill()
        spinner.communicate(timeout=TIME_BOUND_S)
