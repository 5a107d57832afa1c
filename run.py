#!/usr/bin/env python3
"""Complete a prompt with Llama 3: `python run.py [PROMPT] [--ckpt-dir DIR] ...` (see --help)."""

import sys

from llama3_raw.cli import run_script_main

if __name__ == "__main__":
    sys.exit(run_script_main())
