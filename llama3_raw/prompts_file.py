"""`--prompts-file`: prompts for one batch, one per line, or JSON lines with a "prompt" field each."""

import json
from pathlib import Path

from .errors import UserError
from .files import read_text

FORMAT_HELP = 'write one prompt per line, or one JSON object per line such as {"prompt": "Once upon a time"}'


def read_prompts_file(path: Path) -> list[str]:
    """The prompts, in file order; blank lines are skipped. A file whose first non-blank line starts
    with `{` is read as JSON lines (so a prompt may hold newlines), any other as plain lines."""
    text = read_text(path, "--prompts-file", FORMAT_HELP)
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise UserError(f"--prompts-file {path} holds no prompts; {FORMAT_HELP}.")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"--prompts-file {path} line {number} is not valid JSON ({err}); {FORMAT_HELP}.") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise UserError(f"--prompts-file {path} line {number} has no non-empty \"prompt\" string; {FORMAT_HELP}.")
        prompts.append(record["prompt"])
    return prompts
