"""Train a Llama 3 model from scratch: `python -m llama3_raw.train [--config RECIPE.json] [--out DIR] [--resume]`.

One command does everything: learn the BPE tokenizer on the training split, encode the text (cached),
train with AdamW through the same functional `forward` that inference uses, and write the result in
Meta's checkpoint format, which `python run.py --ckpt-dir DIR` (or Meta's own code) loads unchanged.

The output directory holds, besides Meta's files (see export.py):
  train_state.pt    fp32 weights, optimizer state, step and RNG state, to --resume bit-identically
  train_log.jsonl   one line per log interval (train loss) and per evaluation (validation loss)
  loss_curve.png    both losses in nats per character
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import load_splits
from .errors import UserError
from .export import atomic_torch_save, atomic_write_bytes, export_checkpoint
from .loss_curve import plot_loss_curve
from .tokenizer import load_tokenizer
from .train_config import DEFAULT_RECIPE, REPO_ROOT, Recipe, load_recipe
from .train_tokenizer import bpe_file_text, learn_bpe, read_corpus
from .training import (batch_loss, init_weights, learning_rate, param_groups, sample_batch, validation_nll,
                       validation_windows)

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
LOG_INTERVAL = 10  # steps per train-loss line in the JSONL log


def tokenizer_for(train_text: str, bpe_ranks: int, tmp_dir: Path, show_progress: bool):
    """Learn the BPE ranks on the training split only (the validation text stays unseen), then load them
    through the project's tokenizer exactly as run.py will."""
    tokenizer_bytes = bpe_file_text(learn_bpe(train_text, bpe_ranks, show_progress)).encode("ascii")
    path = tmp_dir / "tokenizer.model"
    path.write_bytes(tokenizer_bytes)
    return load_tokenizer(path), tokenizer_bytes


def load_train_state(path: Path, recipe: Recipe) -> dict:
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; start without --resume, or pass the --out of an interrupted run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files; all mean the same to the user
        raise UserError(f"--resume: {path} is not a readable training checkpoint ({type(err).__name__}); "
                        f"start again without --resume.") from None
    if not isinstance(state, dict) or "recipe" not in state:
        raise UserError(f"--resume: {path} is not a training checkpoint written by llama3_raw.train; start again without --resume.")
    if json.loads(state["recipe"]) != recipe.to_dict():
        raise UserError(f"--resume: {path} was trained with a different recipe than --config {recipe.source}; "
                        f"pass the recipe it was started with, or another --out.")
    return state


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The log's records up to the checkpoint's step (lines written after it are replayed by the resumed run)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def append_log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(recipe: Recipe, out_dir: Path, resume: bool = False, stop_after: int | None = None,
          show_progress: bool = True, threads: int | None = None) -> dict:
    """Run (or continue) the recipe; returns the last validation record."""
    settings, params = recipe.train, recipe.params
    torch.set_num_threads(threads or os.cpu_count() or 1)
    text = read_corpus(recipe.corpus, flag="corpus (--corpus or data.corpus)")
    if not text:
        raise UserError(f"the corpus {recipe.corpus} is empty; pass a text file with content.")
    state_path, log_path = out_dir / STATE_FILE, out_dir / LOG_FILE
    state = load_train_state(state_path, recipe) if resume else None
    if state is None and state_path.exists():
        raise UserError(f"--out {out_dir} already holds a training run ({STATE_FILE}); pass --resume to continue "
                        f"it, or choose another --out.")

    with tempfile.TemporaryDirectory() as tmp:
        train_text_len = int(len(text) * (1 - recipe.val_fraction))
        if state is None:
            tokenizer, tokenizer_bytes = tokenizer_for(text[:train_text_len], recipe.bpe_ranks, Path(tmp), show_progress)
        else:
            tokenizer_bytes = bytes(state["tokenizer"].numpy())
            (Path(tmp) / "tokenizer.model").write_bytes(tokenizer_bytes)
            tokenizer = load_tokenizer(Path(tmp) / "tokenizer.model")
    train_split, val_split = load_splits(text, recipe.val_fraction, tokenizer, tokenizer_bytes)
    for name, split in (("training", train_split), ("validation", val_split)):
        if len(split.ids) < settings.context + 1:
            raise UserError(f"--config {recipe.source}: train.context {settings.context} is longer than the {name} "
                            f"split ({len(split.ids)} tokens); lower train.context or use a bigger corpus.")
    chars_per_token = train_split.chars / len(train_split.ids)

    gen = torch.Generator().manual_seed(settings.seed)
    weights = init_weights(params, settings, gen)
    optimizer = torch.optim.AdamW(param_groups(weights, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2), eps=1e-8)
    start_step, running = 0, {"loss_sum": 0.0, "count": 0}
    if state is not None:
        with torch.no_grad():
            for key, tensor in weights.items():
                tensor.copy_(state["weights"][key])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_step, running = state["step"], dict(state["running"])
        records = read_log(log_path, start_step)
    else:
        records = []
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(log_path, "".join(json.dumps(r) + "\n" for r in records).encode())

    ids = torch.from_numpy(train_split.ids.astype(np.int64))
    bos = tokenizer.bos_id
    tokens_per_step = settings.batch_size * settings.context
    print(f"model: {params.parameter_count() / 1e6:.2f}M parameters ({params.n_layers} layers, dim {params.dim}, "
          f"{params.n_heads} heads / {params.n_kv_heads} kv heads, vocab {params.vocab_size}); "
          f"data: {len(train_split.ids)} train / {len(val_split.ids)} validation tokens "
          f"({chars_per_token:.2f} chars/token); {torch.get_num_threads()} threads", file=sys.stderr)

    def save_state(step: int) -> None:
        atomic_torch_save({
            "recipe": json.dumps(recipe.to_dict()), "step": step, "running": running,
            "weights": {k: w.detach().clone() for k, w in weights.items()},
            "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
            "tokenizer": torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8),
        }, state_path)

    def evaluate(step: int, final: bool) -> dict:
        windows = validation_windows(val_split.ids, settings.context, None if final else settings.eval_windows)
        chars = len(tokenizer.decode(np.concatenate(windows).tolist()))
        nll = validation_nll(weights, params, windows, bos, settings.batch_size)
        n_tokens = sum(len(w) for w in windows)
        return {"kind": "val", "step": step, "nats_per_char": nll / chars, "nats_per_token": nll / n_tokens,
                "tokens": n_tokens, "chars": chars, "full": final}

    last_val = next((r for r in reversed(records) if r["kind"] == "val"), None)
    end_step = settings.steps if stop_after is None else min(settings.steps, stop_after)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=settings.steps, desc="training",
               unit="step", disable=not show_progress, mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(ids, settings.context, settings.batch_size, bos, gen)  # (B, C) each
        loss = batch_loss(weights, params, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(weights.values()), settings.grad_clip)
        optimizer.step()

        running["loss_sum"] += loss.item()
        running["count"] += 1
        done = step + 1
        tok_s = (done - start_step) * tokens_per_step / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                        val=f"{last_val['nats_per_char']:.3f}" if last_val else "-", refresh=False)
        if done % LOG_INTERVAL == 0 or done == settings.steps:
            mean = running["loss_sum"] / running["count"]
            record = {"kind": "train", "step": done, "nats_per_token": mean, "nats_per_char": mean / chars_per_token,
                      "lr": lr, "tokens_per_s": round(tok_s, 1), "elapsed_s": round(time.perf_counter() - t0, 1)}
            records.append(record)
            append_log(log_path, record)
            running = {"loss_sum": 0.0, "count": 0}
        if done % settings.eval_interval == 0 or done == settings.steps:
            last_val = evaluate(done, final=done == settings.steps)
            records.append(last_val)
            append_log(log_path, last_val)
            bar.write(f"step {done}: validation {last_val['nats_per_char']:.4f} nats/char "
                      f"({last_val['nats_per_token']:.4f} nats/token)", file=sys.stderr)
            save_state(done)
            generation = {**recipe.generation, "context_len": recipe.train.context}  # run.py and score stay within it
            export_checkpoint(out_dir, weights, params, tokenizer_bytes, generation)
            plot_loss_curve(records, out_dir / CURVE_FILE, f"Llama 3 on {recipe.corpus.name}: "
                            f"{params.parameter_count() / 1e6:.1f}M parameters")
        elif done == end_step:
            save_state(done)  # --stop-after: an interruption on purpose, resumable bit-identically
    bar.close()
    return last_val or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama3_raw.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE,
                        help=f"training recipe JSON (default {DEFAULT_RECIPE.relative_to(REPO_ROOT)})")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "shakespeare",
                        help="output directory (default runs/shakespeare; the shipped model is weights/shakespeare)")
    parser.add_argument("--resume", action="store_true", help=f"continue from DIR/{STATE_FILE}")
    parser.add_argument("--corpus", type=Path, help="text file to train on instead of the recipe's data.corpus")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop (and save a resumable checkpoint) after this step")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores; 1 is faster when another "
                        "busy process shares the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.stop_after is not None and args.stop_after < 1:
            raise UserError(f"--stop-after {args.stop_after} must be at least 1.")
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1.")
        recipe = load_recipe(args.config, args.corpus)
        result = train(recipe, args.out, args.resume, args.stop_after, not args.no_progress, args.threads)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume (from the last checkpoint in {args.out})", file=sys.stderr)
        return 130
    if result:
        print(f"validation: {result['nats_per_char']:.4f} nats/char; checkpoint in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
