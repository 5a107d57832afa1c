"""Execute notebooks/walkthrough.ipynb on the shipped model and render it, pictures and all, as docs/walkthrough.md.

    python notebooks/render.py

Writes docs/walkthrough.md and its pictures docs/walkthrough_files/*.png (old pictures there are removed).
The notebook runs in a kernel of this same Python (whatever `python3` kernels Jupyter knows of elsewhere),
on the shipped model even where official weights exist, so that the rendering is the same on every machine.
The first line of the rendering holds a hash of the notebook's cells; tests/test_walkthrough.py uses it to say
when the rendering is stale. The notebook itself stays tracked without outputs.
"""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
RENDERING = ROOT / "docs" / "walkthrough.md"
PICTURES = "walkthrough_files"  # beside the rendering, as the Markdown links them
CKPT_ENV = "LLAMA3_RAW_WALKTHROUGH_CKPT"  # the notebook's checkpoint folder (default: the library's choice)
DTYPE_ENV = "LLAMA3_RAW_WALKTHROUGH_DTYPE"  # its compute dtype (default: float32 for the shipped model)
KERNEL_NAME = "llama3-raw-walkthrough"
COMMAND = "python notebooks/render.py"
HASH_MARK = "notebook cells sha256: "


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def cells_hash(notebook: nbformat.NotebookNode) -> str:
    """A hash of what the cells say (their kinds and sources), not of outputs or metadata."""
    cells = [[cell.cell_type, cell.source] for cell in notebook.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def execute(notebook: nbformat.NotebookNode, env: dict[str, str] | None = None, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell in order (in place) in a kernel of this Python; raises nbclient's CellExecutionError at the
    first cell that fails. `env` is added to this process's environment for the kernel; `timeout` is per cell."""
    with tempfile.TemporaryDirectory() as kernels:
        spec = Path(kernels) / KERNEL_NAME
        spec.mkdir()
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python", "language": "python"}))
        manager = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = NotebookClient(notebook, km=manager, timeout=timeout, kernel_name=KERNEL_NAME,
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        # the clone's llama3_raw first, installed or not (CI runs the tests from a clone it never installs)
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        client.execute(env={**os.environ, "PYTHONPATH": path, **(env or {})})
    return notebook


def render() -> None:
    from llama3_raw.checkpoints import SHIPPED_MODEL

    notebook = execute(read_notebook(), env={CKPT_ENV: str(SHIPPED_MODEL), DTYPE_ENV: "float32"})
    body, resources = MarkdownExporter().from_notebook_node(notebook, resources={"output_files_dir": PICTURES})
    pictures = RENDERING.parent / PICTURES
    pictures.mkdir(parents=True, exist_ok=True)
    for old in pictures.glob("*.png"):
        old.unlink()
    for name, data in resources["outputs"].items():
        (RENDERING.parent / name).write_bytes(data)
    header = (f"<!-- Rendered from notebooks/walkthrough.ipynb by `{COMMAND}`; edit the notebook, not this file. "
              f"{HASH_MARK}{cells_hash(notebook)} -->\n\n")
    RENDERING.write_text(header + body)
    print(f"wrote {RENDERING.relative_to(ROOT)} and {len(resources['outputs'])} pictures in "
          f"{pictures.relative_to(ROOT)}/")


if __name__ == "__main__":
    render()
