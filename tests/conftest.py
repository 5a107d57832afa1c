import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import helpers.py as a plain module

from llama3_raw import compiled  # noqa: E402
from helpers import TINY_GQA, TINY_MHA_SCALED, TINY_MQA, call, random_state_dict, run_py, write_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def cli(capsys, monkeypatch):
    """A command line run in this process (helpers.call): `cli(*args)` is `python run.py ARGS`; `entry=` names
    another main (helpers.python_m, train.main, train_tokenizer.main), `cwd=` the folder it runs in (as a
    subprocess's cwd; put back after the test). Returns helpers.Called: returncode, stdout, stderr."""
    def run(*args, entry=run_py, cwd=None):
        if cwd is not None:
            monkeypatch.chdir(cwd)
        return call(entry, list(args), capsys)

    return run


@pytest.fixture(scope="session")
def gqa_checkpoint(tmp_path_factory):
    """(directory, params dict, state dict) of a tiny GQA checkpoint: 8 query heads on 2 kv heads, bf16."""
    state = random_state_dict(TINY_GQA, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("gqa"), TINY_GQA, state), TINY_GQA, state


@pytest.fixture(scope="session")
def mqa_checkpoint(tmp_path_factory):
    state = random_state_dict(TINY_MQA, seed=2)
    return write_checkpoint(tmp_path_factory.mktemp("mqa"), TINY_MQA, state), TINY_MQA, state


@pytest.fixture(scope="session")
def scaled_tied_checkpoint(tmp_path_factory):
    """Llama 3.1-style scaled RoPE, and no output.weight (tied to the embeddings, as Llama 3.2 1B/3B)."""
    state = random_state_dict(TINY_MHA_SCALED, seed=3, with_output=False)
    return write_checkpoint(tmp_path_factory.mktemp("scaled"), TINY_MHA_SCALED, state), TINY_MHA_SCALED, state


# The compiled decode kernels (tests/test_decode_kernels.py, test_decode_steps.py). Where the package was installed
# without them (CI runs the tests from a clone), they are compiled from the same source, with the same flags as
# setup.py, into a temporary folder; where there is no C compiler or the CPU lacks AVX-512 BF16/VNNI/VBMI/GFNI,
# the tests that use them skip.
SOURCE = Path(__file__).resolve().parent.parent / "llama3_raw" / "csrc" / "decode_kernels.c"
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # as setup.py


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The compiled module: as installed, or compiled now from the source."""
    module = compiled.built
    if module is None:
        out = tmp_path_factory.mktemp("kernels") / ("_decode_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
        command = [sysconfig.get_config_var("CC").split()[0] or "cc", *FLAGS, "-shared", "-fPIC",
                   "-I" + sysconfig.get_paths()["include"], str(SOURCE), "-o", str(out)]
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.CalledProcessError) as e:
            pytest.skip(f"no C compiler to build the kernels: {e}")
        spec = importlib.util.spec_from_file_location("_decode_kernels", out)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not module.supported():
        pytest.skip("this CPU lacks AVX-512 BF16/VNNI/VBMI/GFNI")
    return module


@pytest.fixture
def kernels_on(built, monkeypatch):
    monkeypatch.setattr(compiled, "built", built)
    monkeypatch.delenv(compiled.SWITCH_ENV, raising=False)
    assert compiled.usable()


