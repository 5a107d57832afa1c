"""Installed, not only cloned (issue 14): the wheel carries the shipped model, and `llama3-raw` runs it from
any directory. The wheel is built here without network (`--no-build-isolation`, with this environment's
setuptools) and installed without its dependencies into a fresh virtual environment, which borrows torch &
co. from this one through a .pth file; without pip or setuptools here the test is skipped."""

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a wheel built and installed into a fresh virtual environment


def pip(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh virtual environment with the built wheel installed in it."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("pip and setuptools are needed to build and install the wheel")
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so that the build's own folders (build/, *.egg-info) stay out of the clone
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "llama3_raw", source / "llama3_raw",
                    ignore=shutil.ignore_patterns("__pycache__", "train_state.pt"))
    built = pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp / "dist", source)
    if built.returncode != 0:
        pytest.skip(f"could not build the wheel here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp / "dist").glob("llama3_raw-*.whl"))
    venv.EnvBuilder(with_pip=False).create(tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    installed = pip("--python", python, "install", "--no-deps", "--no-index", wheel)
    assert installed.returncode == 0, installed.stderr
    own_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    borrowed = [path for path in site.getsitepackages() if Path(path).is_dir()]
    (Path(own_site) / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")  # torch, tiktoken, ...
    return tmp / "venv" / "bin"


def run_installed(bin_dir: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLAMA3_RAW_WEIGHTS")}
    return subprocess.run([bin_dir / "llama3-raw", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=dict(env, OMP_NUM_THREADS="1"), timeout=300)


def test_the_installed_command_runs_the_shipped_model_from_another_directory(installed, tmp_path):
    result = run_installed(installed, "--max-new-tokens", 5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:\n")  # the shipped model's own prompt, from its generation.json
    loaded = next(line for line in result.stderr.splitlines() if line.startswith("loaded "))
    assert "site-packages" in loaded and "shipped" in loaded and str(REPO) not in loaded
    assert "./weights/NAME/" in loaded and "LLAMA3_RAW_WEIGHTS" in loaded  # where official weights would go


def test_the_installed_command_has_the_subcommands_and_finds_dot_weights(installed, tmp_path):
    help_text = run_installed(installed, "--help", cwd=tmp_path).stdout
    assert help_text.startswith("usage: llama3-raw") and all(c in help_text for c in ("chat", "inspect", "score"))
    (tmp_path / "weights" / "Mine").mkdir(parents=True)
    (tmp_path / "weights" / "Mine" / "params.json").write_text("{}")
    (tmp_path / "weights" / "Mine" / "consolidated.00.pth").write_bytes(b"")
    result = run_installed(installed, "--max-new-tokens", 1, cwd=tmp_path)  # ./weights/Mine is taken (and broken)
    assert result.returncode == 2 and "weights/Mine" in result.stderr, result.stderr
