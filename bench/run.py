"""Kept for older instructions: `python bench/run.py ARGS` is `python -m bench ARGS` (see bench/__main__.py)."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    runpy.run_module("bench", run_name="__main__")
