"""`python -m llama3_raw score FILE`: how well the model predicts a text, in perplexity and nats per character.

Long texts are scored with a sliding window: each window holds `<|begin_of_text|>` and up to
`window - 1` tokens of context, and only the tokens not scored by an earlier window count, so every
token is scored once, with at least `window - stride` tokens of context after the first window.
Nats per character (total negative log-likelihood / characters) compares models whose tokenizers differ.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoints import open_model
from ..checkpoints.defaults import fraction, positive_int
from ..errors import UserError
from ..events import run_tool
from ..files import read_text
from ..model import forward
from ..params import ModelParams
from .common import add_common_arguments, tool_main


@dataclass(frozen=True)
class Score:
    tokens: int
    characters: int
    total_nll: float  # nats, summed over all scored tokens

    @property
    def nats_per_token(self) -> float:
        return self.total_nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def nats_per_char(self) -> float:
        return self.total_nll / self.characters


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(context_start, score_start, end) per window: its input is BOS + tokens [context_start, end - 1),
    `window` positions at most, and it scores tokens [score_start, end)."""
    spans = []
    scored_to = 0
    while scored_to < n_tokens:
        end = min(n_tokens, window if scored_to == 0 else scored_to + stride)
        spans.append((max(0, end - window), scored_to, end))
        scored_to = end
    return spans


def sequence_nll(weights, params: ModelParams, token_ids: list[int], bos_id: int, window: int, stride: int,
                 show_progress: bool = False) -> float:
    """Summed NLL of `token_ids` (each predicted from BOS + what precedes it inside its window)."""
    device = weights["norm.weight"].device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    total = 0.0
    spans = window_spans(len(token_ids), window, stride)
    with torch.inference_mode():
        for context_start, score_start, end in tqdm(spans, desc="scoring", unit="window", disable=not show_progress):
            targets = ids[context_start:end]  # (L,)
            inputs = torch.cat([ids.new_tensor([bos_id]), targets[:-1]])  # (L,): BOS, then each target's predecessor
            logits, _ = forward(weights, params, inputs[None])  # (1, L, V)
            nll = F.cross_entropy(logits[0].float(), targets, reduction="none")  # (L,)
            total += nll[score_start - context_start:].sum().item()
    return total


def score_text(weights, params: ModelParams, tokenizer, text: str, window: int, stride: int,
               show_progress: bool = False) -> Score:
    token_ids = tokenizer.encode(text, bos=False)
    nll = sequence_nll(weights, params, token_ids, tokenizer.bos_id, window, stride, show_progress)
    return Score(len(token_ids), len(text), nll)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, with_prompt=False)
    parser.add_argument("file", metavar="FILE", type=Path, help="UTF-8 text file to score")
    parser.add_argument("--window", type=positive_int, help="tokens per window including BOS (default: the model's "
                        "trained context from generation.json, else min(context, 2048))")
    parser.add_argument("--stride", type=positive_int, help="new tokens scored per window after the first (default window/2)")
    parser.add_argument("--tail", type=fraction, metavar="FRACTION", help="score only the last FRACTION of the file's "
                        "characters, e.g. 0.1 for Tiny Shakespeare's validation split")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    def work():
        text = read_text(args.file, fix="pass the path of a UTF-8 text file to score")
        if not text:
            raise UserError(f"{args.file} is empty; there is nothing to score.")
        if args.tail is not None:
            text = text[len(text) - int(len(text) * args.tail):]  # the split training uses: last 10 % by characters
        model = open_model(args.ckpt_dir, args.tokenizer, args.dtype, args.device, show_progress=not args.json,
                           threads=args.threads)
        trained = model.defaults.get("context_len")
        window = args.window or trained or min(model.params.context_len, 2048)
        if not 2 <= window <= model.params.context_len:
            raise UserError(f"--window {window} must be between 2 and the model's context {model.params.context_len}.")
        stride = args.stride or max(1, window // 2)
        if not 1 <= stride <= window - 1:
            raise UserError(f"--stride {stride} must be between 1 and window - 1 = {window - 1}.")
        score = score_text(model.weights, model.params, model.tokenizer, text, window, stride, not args.json)
        result = {**asdict(score), "nats_per_token": score.nats_per_token, "perplexity": score.perplexity,
                  "nats_per_char": score.nats_per_char, "window": window, "stride": stride, "model": str(model.directory)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.file}: {score.characters} characters, {score.tokens} tokens, window {window}, stride {stride}")
            print(f"perplexity {score.perplexity:.3f} per token ({score.nats_per_token:.4f} nats/token), "
                  f"{score.nats_per_char:.4f} nats/char ({score.nats_per_char / math.log(2):.4f} bits/char)")

    return run_tool(work)


def main(argv: list[str] | None = None) -> int:
    return tool_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
