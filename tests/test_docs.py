"""Every code block in README.md and docs/*.md that is meant to run is run, on the shipped model.

The convention (docs/tests.md, *The docs are tested*), read from each fenced block's tag and the HTML comments on
the lines right above its opening fence:

- ```bash and ```python blocks run. A bash block runs as `bash -e` in its own subprocess; a python block runs in
  this process in a fresh namespace. Both run in a fresh temporary folder that holds a copy of run.py, data/ and
  weights/ (links to the clone's), so anything a block writes lands there and never in the clone; the package is
  the clone's (PYTHONPATH), $LLAMA3_RAW_WEIGHTS is unset, and every block has a time limit (BLOCK_TIMEOUT_S).
- `<!-- not run: REASON -->` above a bash or python block skips it; the reason is required (official weights,
  a GPU, several machines, a long training run, a download, an install, ...).
- `<!-- exit code N -->` above a bash block: it is meant to exit with N (e.g. compare's MISMATCH exits 1).
- ```text blocks are output shown in the docs, always of the nearest bash or python block above them, and must
  say which kind they are: `<!-- example output -->` (not compared: it depends on time, the machine, an unseeded
  draw, or a model that is not here) or `<!-- checked output -->`, compared with what the block printed on stdout:
  line by line in order, where `...` inside a line stands for any text and a line of only `...` for any lines.
- Any other tag (```tree, ```json) is an illustration and never runs; a fence without a tag fails the test.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# docs/walkthrough.md is the notebook's rendering: its cells run in order, as one notebook, in test_walkthrough.py
RENDERED = {REPO / "docs" / "walkthrough.md"}
DOCS = [REPO / "README.md", *sorted(set((REPO / "docs").glob("*.md")) - RENDERED)]
RUNNABLE = {"bash", "python"}
OUTPUT = "text"
ILLUSTRATION = {"tree", "json"}
BLOCK_TIMEOUT_S = 120

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<tag>[^`\s]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    markers: list[str]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def marker(self, prefix: str) -> str | None:
        """The text after `prefix` in the first marker that starts with it (None if none does)."""
        found = [m[len(prefix):].strip() for m in self.markers if m.startswith(prefix)]
        return found[0] if found else None

    @property
    def not_run(self) -> str | None:
        return self.marker("not run:")


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        markers, j = [], i - 1
        while j >= 0 and MARKER.match(lines[j]):
            markers.insert(0, MARKER.match(lines[j])["body"])
            j -= 1
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        assert end < len(lines), f"{path.relative_to(REPO)}:{i + 1}: a code fence that is never closed"
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:end]]
        blocks.append(Block(path, i + 1, opening["tag"], "\n".join(body) + "\n", markers))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in blocks_of(path)]


def runnable_blocks() -> list[Block]:
    return [b for b in ALL_BLOCKS if b.tag in RUNNABLE]


def checked_output_of(block: Block) -> Block | None:
    """The ```text block marked `checked output` that shows what `block` prints, if there is one."""
    same_file = [b for b in ALL_BLOCKS if b.path == block.path]
    for later in same_file[same_file.index(block) + 1:]:
        if later.tag in RUNNABLE:
            return None
        if later.tag == OUTPUT and "checked output" in later.markers:
            return later
    return None


def producer_of(output: Block) -> Block | None:
    same_file = [b for b in ALL_BLOCKS if b.path == output.path]
    earlier = [b for b in same_file[:same_file.index(output)] if b.tag in RUNNABLE]
    return earlier[-1] if earlier else None


# --- the convention itself -------------------------------------------------------------------------------------

def test_every_block_has_a_known_tag_and_every_marker_is_complete():
    problems = []
    for block in ALL_BLOCKS:
        if block.tag not in RUNNABLE | {OUTPUT} | ILLUSTRATION:
            problems.append(f"{block.name}: tag {block.tag!r} is none of {sorted(RUNNABLE | {OUTPUT} | ILLUSTRATION)}")
        for marker in block.markers:
            if marker.startswith("not run") and not re.match(r"not run:\s*\S", marker):
                problems.append(f"{block.name}: 'not run' without a reason")
            if marker.startswith("not run") and block.tag not in RUNNABLE:
                problems.append(f"{block.name}: 'not run' on a {block.tag!r} block, which never runs anyway")
        if block.tag == OUTPUT:
            kinds = [m for m in block.markers if m in ("example output", "checked output")]
            if len(kinds) != 1:
                problems.append(f"{block.name}: output must be marked either example output or checked output")
            producer = producer_of(block)
            if producer is None:
                problems.append(f"{block.name}: output with no bash or python block above it")
            elif "checked output" in kinds and producer.not_run:
                problems.append(f"{block.name}: checked output of {producer.name}, which is not run")
    assert not problems, "\n".join(problems)


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    ci_command = next(line for line in ci if line.startswith("python3 -m venv"))
    readme = [b for b in ALL_BLOCKS if b.path.name == "README.md" and b.tag == "bash"]
    assert any(b.code.strip() == ci_command for b in readme), "README.md no longer shows the command .ci/run runs"


def anchors_of(path: Path) -> set[str]:
    """The #anchors GitHub makes of a markdown file's headings: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_relative_links_and_images_point_at_files_and_headings():
    link = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for match in link.finditer(text):
            target, _, anchor = match["target"].partition("#")
            if re.match(r"[a-z]+:", target):
                continue
            resolved = (path.parent / target).resolve() if target else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: {match['target']}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
                broken.append(f"{path.relative_to(REPO)}: {match['target']} (no such heading)")
    assert not broken, "\n".join(broken)


# --- running the blocks ----------------------------------------------------------------------------------------

def matches(shown: str, printed: str) -> bool:
    """`shown` (a ```text block) against `printed`: `...` in a line = any text, a line of `...` = any lines."""
    pattern = []
    for line in shown.rstrip("\n").splitlines():
        if line.strip() == "...":
            pattern.append(r"(?:[^\n]*\n)*?")
        else:
            pattern.append(".*".join(map(re.escape, line.rstrip().split("..."))) + r"[ \t]*\n")
    return re.fullmatch("".join(pattern), printed.rstrip("\n") + "\n" if printed else "") is not None


@pytest.fixture(scope="module")
def shipped_model_is_the_default():
    from llama3_raw.checkpoints import find_default_checkpoint, is_shipped_model
    env = os.environ.pop("LLAMA3_RAW_WEIGHTS", None)
    try:
        found = find_default_checkpoint()
    finally:
        if env is not None:
            os.environ["LLAMA3_RAW_WEIGHTS"] = env
    if not is_shipped_model(found):
        pytest.skip(f"official weights are the default here ({found}); the docs' blocks are written for the shipped model")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder to run a block in: run.py copied, data/ and weights/ linked, the clone's package importable."""
    shutil.copy(REPO / "run.py", tmp_path / "run.py")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").symlink_to(REPO / "data" / "tinyshakespeare.txt")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "shakespeare").symlink_to(REPO / "llama3_raw" / "shipped" / "shakespeare")
    monkeypatch.delenv("LLAMA3_RAW_WEIGHTS", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_bash(block: Block, workdir: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA3_RAW_WEIGHTS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run(["bash", "-e", "-c", block.code], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)
    return done.returncode, done.stdout, done.stderr


def run_python(block: Block) -> str:
    def too_long(signum, frame):
        raise TimeoutError(f"{block.name} ran past {BLOCK_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(BLOCK_TIMEOUT_S)
    out = StringIO()
    try:
        with redirect_stdout(out):
            exec(compile(block.code, block.name, "exec"), {"__name__": "__doc_block__"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return out.getvalue()


@pytest.mark.slow  # each block a fresh bash and Python on the shipped model; the checks above stay in the fast tier
@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.name)
def test_doc_block_runs(block, workdir, shipped_model_is_the_default):
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    if block.tag == "bash":
        expected = int(block.marker("exit code") or 0)
        code, stdout, stderr = run_bash(block, workdir)
        assert code == expected, f"{block.name} exited {code}, not {expected}:\n{block.code}\n{stderr[-3000:]}"
    else:
        stdout = run_python(block)
    output = checked_output_of(block)
    if output is not None:
        assert matches(output.code, stdout), (f"{output.name} does not show what {block.name} prints:\n"
                                              f"--- shown\n{output.code}--- printed\n{stdout}")
