"""Validation nats per character of a checkpoint by Meta's own code: `llama_models`' Transformer and Tokenizer.

    python -m bench.meta_validation weights/shakespeare [--corpus data/tinyshakespeare.txt] [--context 256]

The issue's measure for the shipped model, computed without this project's model or tokenizer: the last
10 % of the corpus by characters, encoded by Meta's Tokenizer, cut into back-to-back windows of `context`
tokens, each predicted from <|begin_of_text|> onwards (as training's validation does), total NLL / characters.
"""

import argparse
import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def meta_model(ckpt_dir: Path, max_seq_len: int):
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        dist.init_process_group("gloo", rank=0, world_size=1)
        fs_init.initialize_model_parallel(1)
    params = json.loads((ckpt_dir / "params.json").read_text())
    torch.set_default_dtype(torch.float32)
    model = Transformer(ModelArgs(max_seq_len=max_seq_len, max_batch_size=16, **params))
    model.load_state_dict(torch.load(ckpt_dir / "consolidated.00.pth", weights_only=True), strict=True)
    return model.eval()


def validation_nats_per_char(ckpt_dir: Path, corpus: Path, context: int, val_fraction: float = 0.1) -> dict:
    from llama_models.llama3.tokenizer import Tokenizer

    text = corpus.read_text(encoding="utf-8")
    val_text = text[int(len(text) * (1 - val_fraction)):]
    tokenizer = Tokenizer(ckpt_dir / "tokenizer.model")
    ids = torch.tensor(tokenizer.encode(val_text, bos=False, eos=False))
    model = meta_model(ckpt_dir, context)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids), context * 16):
            block = ids[start:start + context * 16]
            for window in block.split(context):
                inputs = torch.cat([torch.tensor([tokenizer.bos_id]), window[:-1]])[None]
                logits = model.forward(inputs, 0)  # Meta's forward: (1, L, V)
                total += F.cross_entropy(logits[0].float(), window, reduction="sum").item()
    return {"nats_per_char": total / len(val_text), "nats_per_token": total / len(ids), "tokens": len(ids),
            "chars": len(val_text), "bits_per_char": total / len(val_text) / math.log(2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.meta_validation", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "tinyshakespeare.txt")
    parser.add_argument("--context", type=int, default=256, help="tokens per window (the recipe's train.context)")
    args = parser.parse_args()
    print(json.dumps(validation_nats_per_char(args.ckpt_dir, args.corpus, args.context)))


if __name__ == "__main__":
    main()
