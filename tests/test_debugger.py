"""A debugger lands in the math: pdb's `s` from a line of model.py that calls rms_norm, attend or the products
stops inside that function's body in model.py -- with the compiled kernels built and decoding bf16, where the
decode loop would otherwise run their compiled twins (fast_forward.py), and without them.

pdb is driven non-interactively: its commands come from a string, its screen is read back."""

import bdb
import io
import pdb
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_state_dict

from llama3_raw import compiled, fast_forward, model
from llama3_raw.generate import generate
from llama3_raw.params import params_from_dict

REPO = Path(__file__).resolve().parent.parent
MODEL_PY = Path(model.__file__).resolve()
# head_dim 16, so that every compiled piece applies to the decode steps (compiled.py: multiples of 16)
SHAPE = dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, norm_eps=1e-5,
             rope_theta=500000.0)


def line_of(text: str) -> int:
    """The line of model.py that holds `text` (found anew, so the test follows edits of model.py)."""
    lines = [i for i, line in enumerate(MODEL_PY.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, f"{text!r} is on lines {lines} of model.py"
    return lines[0]


def where_pdb_stops(commands: list[str], work) -> list[tuple[str, int, str, str]]:
    """Run `work` under pdb typing `commands`; each place pdb stopped as (file, line, function, source line)."""
    screen = io.StringIO()
    debugger = pdb.Pdb(stdin=io.StringIO("\n".join(commands + ["q"]) + "\n"), stdout=screen, nosigint=True,
                       readrc=False)
    debugger.use_rawinput = False
    try:
        debugger.runcall(work)
    finally:
        debugger.clear_all_breaks()
        bdb.Breakpoint.clearBreakpoints()
    return stops_on(screen.getvalue())


def stops_on(screen: str) -> list[tuple[str, int, str, str]]:
    """pdb shows where it stopped as `> FILE(LINE)FUNCTION()` and, on the next line, `-> SOURCE LINE`."""
    return re.findall(r"> ([^\s(]+)\((\d+)\)([^\s(]+)\(\)\n-> (.*)", screen)


@pytest.fixture
def decoding_bf16():
    """Greedy generation with a small bf16 model: a 4-token prompt, then decode steps (one new position each)."""
    return decoding(torch.bfloat16)


def decoding(dtype: torch.dtype):
    params, weights = params_from_dict(SHAPE), random_state_dict(SHAPE, seed=5, dtype=dtype)
    return lambda: list(generate(weights, params, [1, 2, 3, 4], 3, stop_ids=()))


def decode_step_stop(call_line: str) -> list[str]:
    """Break on model.py's line that holds `call_line`, in a decode step only (one new position); then one `s`
    (pdb stops on entering the function, at its `def` line: "--Call--"), and `n` to its first line of code."""
    return [f"b {MODEL_PY}:{line_of(call_line)}, x.shape[1] == 1", "c", "s", "n"]


@pytest.mark.parametrize("kernels,dtype", [("built", torch.bfloat16), ("absent", torch.bfloat16),
                                          ("built", torch.float32)])
def test_one_step_into_rms_norm_and_attend_lands_in_their_bodies(kernels, dtype, request, monkeypatch):
    if kernels == "built":
        request.getfixturevalue("kernels_on")
    else:
        monkeypatch.setattr(compiled, "built", None)
    for call_line, function, first_line in [
        ("attention_in = rms_norm(x, ", "rms_norm", "x32 = at_least_fp32(x)"),
        ("mixed = attend(q, k, v, mask, record, name)", "attend", "(batch, seq_len, n_heads, head_dim), n_kv_heads"),
    ]:
        stops = where_pdb_stops(decode_step_stop(call_line), decoding(dtype))
        assert len(stops) >= 4, stops  # the start, the breakpoint, the step, the next line
        at_break, after_step, first_of_body = stops[1:4]
        assert (Path(at_break[0]).resolve(), call_line in at_break[3]) == (MODEL_PY, True)
        assert (Path(after_step[0]).resolve(), after_step[2]) == (MODEL_PY, function)
        assert after_step[3].startswith(f"def {function}(")
        assert (Path(first_of_body[0]).resolve(), first_of_body[2]) == (MODEL_PY, function)
        assert first_of_body[3].startswith(first_line)


def test_stepping_into_a_product_shows_x_times_w_transposed(decoding_bf16, kernels_on):
    for call_line, function in [("q, k, v = matmuls(x, wq, wk, wv)", "matmuls"),
                                ("out = matmul(mixed, wo)", "matmul")]:
        stops = where_pdb_stops(decode_step_stop(call_line), decoding_bf16)
        assert [stop[2] for stop in stops[2:4]] == [function, function] and "x @ w.T" in stops[3][3]


def test_untraced_the_same_decode_runs_the_compiled_twins(decoding_bf16, kernels_on, monkeypatch):
    """What the debugger is kept out of: without a tracer the decode steps do call the compiled pieces."""
    calls = []
    for name in ("rms_norm", "attend"):
        kernel = getattr(compiled.built, name)
        monkeypatch.setattr(compiled.built, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a),
                            raising=False)
    assert sys.gettrace() is None
    decoding_bf16()
    assert {"rms_norm", "attend"} <= set(calls)


def test_a_tracer_gets_model_py_and_the_same_tokens(decoding_bf16, kernels_on):
    """Under any tracer (a debugger, coverage) generation runs model.py's own functions: same greedy tokens."""
    untraced = decoding_bf16()
    seen = set()

    def tracer(frame, event, arg):
        if event == "call" and Path(frame.f_code.co_filename).resolve() == MODEL_PY:
            seen.add(frame.f_code.co_name)
        return None

    sys.settrace(tracer)
    try:
        traced = decoding_bf16()
    finally:
        sys.settrace(None)
    assert {"rms_norm", "apply_rope", "attend", "matmuls", "matmul"} <= seen
    assert traced == untraced


def test_the_readme_recipe_works_as_pasted():
    """README's pdb session on the shipped model, typed as a learner would: a breakpoint in forward, then one in
    layer 3's transformer_block, a step into rms_norm."""
    command = ("python -m pdb -c 'import llama3_raw.model' -c 'b llama3_raw.model.forward' -c c "
               "run.py --max-new-tokens 2 --temperature 0")
    readme = (REPO / "README.md").read_text()
    assert command in readme
    typed = ["p tokens.shape", "b transformer_block, layer == 3", "c", "n", "s", "n", "p x.shape", "q"]
    result = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=REPO,
                            input="\n".join(typed) + "\n", capture_output=True, text=True, timeout=120)
    screen = result.stdout
    assert "model.py" in screen and "forward()" in screen
    assert "torch.Size([1, 3])" in screen  # the shipped model's default prompt, "ROMEO:\n", in 3 tokens
    stops = stops_on(screen)
    assert [s[2] for s in stops][-4:] == ["transformer_block"] * 2 + ["rms_norm"] * 2
    assert stops[-1][3] == "x32 = at_least_fp32(x)"
    assert "torch.Size([1, 3, 256])" in screen  # x in layer 3 during the prefill: 3 positions of dim 256
    # the session README shows is this one: every place it shows pdb stopping, line numbers included
    shown = set(re.findall(r"model\.py\((\d+)\)(\w+)\(\)", readme))
    assert shown and shown <= {(line, function) for _, line, function, _ in stops}
