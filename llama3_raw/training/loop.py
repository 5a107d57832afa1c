"""The training loop: set up (or resume) a run, take one optimizer step at a time, evaluate and export.

Training runs the very `forward` that inference runs (through objective.batch_loss), on a flat dict of
fp32 leaf tensors with Meta's key names. One command does everything: learn the BPE tokenizer on the
training split, encode the text (cached), train with AdamW, and write the result in Meta's checkpoint
format (export.py), which `python run.py --ckpt-dir DIR` (or Meta's own code) loads unchanged.
"""

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import check_writable_folder, read_text
from ..params import ModelParams
from ..tokenizer import Tokenizer, tokenizer_from_bytes
from .bpe import bpe_file_text, learn_bpe
from .data import Split, load_splits
from .export import export_checkpoint
from .loss_curve import plot_loss_curve
from .objective import batch_loss, init_weights, learning_rate, param_groups, sample_batch, validation_nll, validation_windows
from ..threads import use_training_threads
from .recipe import Recipe
from .state import LOG_FILE, STATE_FILE, append_log, load_train_state, read_log, save_train_state, write_log

CURVE_FILE = "loss_curve.png"
LOG_INTERVAL = 10  # steps per train-loss line in the JSONL log


@dataclass
class TrainingRun:
    """What a run holds while it trains; the model math itself stays in objective.py and model.py."""

    recipe: Recipe
    out_dir: Path
    tokenizer: Tokenizer
    tokenizer_bytes: bytes
    train_split: Split
    val_split: Split
    weights: dict[str, torch.Tensor]  # fp32 leaf tensors, Meta's key names
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws the batches
    step: int  # optimizer steps taken
    running: dict  # train loss summed since the last log line: {"loss_sum", "count"}
    records: list[dict]  # the log so far

    @property
    def chars_per_token(self) -> float:
        return self.train_split.chars / len(self.train_split.ids)


def learn_tokenizer(train_text: str, bpe_ranks: int, show_progress: bool) -> tuple[Tokenizer, bytes]:
    """Learn the BPE ranks on the training split only (the validation text stays unseen), then load them
    through the project's tokenizer exactly as run.py will."""
    return tokenizer_with_bytes(bpe_file_text(learn_bpe(train_text, bpe_ranks, show_progress)).encode("ascii"))


def tokenizer_with_bytes(tokenizer_bytes: bytes) -> tuple[Tokenizer, bytes]:
    return tokenizer_from_bytes(tokenizer_bytes), tokenizer_bytes


def prepare_data(recipe: Recipe, state: dict | None, show_progress: bool) -> tuple[Tokenizer, bytes, Split, Split]:
    """The tokenizer (learned now, or the resumed run's) and both splits encoded, checked against the context."""
    text = read_text(recipe.corpus, "corpus (--corpus or data.corpus)")
    if not text:
        raise UserError(f"the corpus {recipe.corpus} is empty; pass a text file with content.")
    if state is None:
        train_text = text[:int(len(text) * (1 - recipe.val_fraction))]
        tokenizer, tokenizer_bytes = learn_tokenizer(train_text, recipe.bpe_ranks, show_progress)
    else:
        tokenizer, tokenizer_bytes = tokenizer_with_bytes(bytes(state["tokenizer"].numpy()))
    train_split, val_split = load_splits(text, recipe.val_fraction, tokenizer, tokenizer_bytes)
    context = recipe.train.context
    for name, split in (("training", train_split), ("validation", val_split)):
        if len(split.ids) < context + 1:
            raise UserError(f"--config {recipe.source}: train.context {context} is longer than the {name} "
                            f"split ({len(split.ids)} tokens); lower train.context or use a bigger corpus.")
    return tokenizer, tokenizer_bytes, train_split, val_split


def run_files_bytes(params: ModelParams) -> int:
    """About what a run writes to --out: its state (fp32 weights and AdamW's two moments), a second copy of
    it while the new one replaces the old, and the bf16 export."""
    return (2 * 12 + 2) * params.parameter_count() + (1 << 20)


def start_run(recipe: Recipe, out_dir: Path, resume: bool, show_progress: bool) -> TrainingRun:
    """A new run from the recipe's seed, or the interrupted one in `out_dir` exactly where it stopped."""
    settings, params = recipe.train, recipe.params
    check_writable_folder(out_dir, "--out", run_files_bytes(params))  # before the tokenizer is learned
    state_path = out_dir / STATE_FILE
    state = load_train_state(state_path, recipe) if resume else None
    if state is None and state_path.exists():
        raise UserError(f"--out {out_dir} already holds a training run ({STATE_FILE}); pass --resume to continue "
                        f"it, or choose another --out.")
    tokenizer, tokenizer_bytes, train_split, val_split = prepare_data(recipe, state, show_progress)
    generator = torch.Generator().manual_seed(settings.seed)
    weights = init_weights(params, settings, generator)
    optimizer = torch.optim.AdamW(param_groups(weights, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2), eps=1e-8)
    run = TrainingRun(recipe, out_dir, tokenizer, tokenizer_bytes, train_split, val_split, weights, optimizer,
                      generator, step=0, running={"loss_sum": 0.0, "count": 0}, records=[])
    if state is not None:
        with torch.no_grad():
            for key, tensor in weights.items():
                tensor.copy_(state["weights"][key])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        run.step, run.running = state["step"], dict(state["running"])
        run.records = read_log(out_dir / LOG_FILE, run.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_log(out_dir / LOG_FILE, run.records)
    return run


def train_step(run: TrainingRun, train_ids: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on a fresh random batch; returns (loss in nats per token, learning rate)."""
    settings = run.recipe.train
    lr = learning_rate(run.step, settings)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, targets = sample_batch(train_ids, settings.context, settings.batch_size, run.tokenizer.bos_id,
                                   run.generator)  # (B, C) each
    loss = batch_loss(run.weights, run.recipe.params, inputs, targets)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(run.weights.values()), settings.grad_clip)
    run.optimizer.step()
    run.step += 1
    run.running["loss_sum"] += loss.item()
    run.running["count"] += 1
    return loss.item(), lr


def log_training(run: TrainingRun, lr: float, tok_s: float, elapsed_s: float) -> None:
    """One train line: the mean loss since the last one."""
    mean = run.running["loss_sum"] / run.running["count"]
    record(run, {"kind": "train", "step": run.step, "nats_per_token": mean, "nats_per_char": mean / run.chars_per_token,
                 "lr": lr, "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed_s, 1)})
    run.running = {"loss_sum": 0.0, "count": 0}


def record(run: TrainingRun, line: dict) -> None:
    run.records.append(line)
    append_log(run.out_dir / LOG_FILE, line)


def evaluate(run: TrainingRun, final: bool) -> dict:
    """Validation loss: the first eval_windows windows of the split, or (final) all of it."""
    settings = run.recipe.train
    windows = validation_windows(run.val_split.ids, settings.context, None if final else settings.eval_windows)
    chars = len(run.tokenizer.decode(np.concatenate(windows).tolist()))
    nll = validation_nll(run.weights, run.recipe.params, windows, run.tokenizer.bos_id, settings.batch_size)
    n_tokens = sum(len(w) for w in windows)
    return {"kind": "val", "step": run.step, "nats_per_char": nll / chars, "nats_per_token": nll / n_tokens,
            "tokens": n_tokens, "chars": chars, "full": final}


def save_state(run: TrainingRun) -> None:
    save_train_state(run.out_dir / STATE_FILE, run.recipe, run.step, run.running, run.weights, run.optimizer,
                     run.generator, run.tokenizer_bytes)


def export(run: TrainingRun) -> None:
    """The model as it is now, in Meta's format, with its loss curve: runnable at every evaluation."""
    recipe, params = run.recipe, run.recipe.params
    generation = {**recipe.generation, "context_len": recipe.train.context}  # run.py and score stay within it
    export_checkpoint(run.out_dir, run.weights, params, run.tokenizer_bytes, generation)
    plot_loss_curve(run.records, run.out_dir / CURVE_FILE,
                    f"Llama 3 on {recipe.corpus.name}: {params.parameter_count() / 1e6:.1f}M parameters")


def describe(run: TrainingRun) -> str:
    params, train_split = run.recipe.params, run.train_split
    return (f"model: {params.parameter_count() / 1e6:.2f}M parameters ({params.n_layers} layers, dim {params.dim}, "
            f"{params.n_heads} heads / {params.n_kv_heads} kv heads, vocab {params.vocab_size}); "
            f"data: {len(train_split.ids)} train / {len(run.val_split.ids)} validation tokens "
            f"({run.chars_per_token:.2f} chars/token); {torch.get_num_threads()} thread(s)")


@dataclass(frozen=True)
class TrainingStop:
    """How a call to train() ended, for the command line to tell: where the state is and what is runnable."""

    reason: str  # "finished" (the recipe's last step), "stopped" (stop_after) or "interrupted" (Ctrl-C)
    step: int
    total_steps: int
    state_path: Path  # resumable state (fp32 weights, optimizer, RNG)
    exported_step: int | None  # the step of the model in Meta's format in out_dir; None: none exported yet
    next_export_step: int  # where the next evaluation (and export) comes
    last_val: dict | None
    log_records: int  # lines in train_log.jsonl


class StopRequest:
    """Ctrl-C during the steps asks the loop to stop after the current step and save its state; a second one
    stops at once. Only the main thread can catch signals, so elsewhere Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, _signum, _frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def stop_report(run: TrainingRun, reason: str, last_val: dict | None) -> TrainingStop:
    settings = run.recipe.train
    exported = last_val["step"] if last_val and (run.out_dir / "consolidated.00.pth").is_file() else None
    next_export = min(settings.steps, (run.step // settings.eval_interval + 1) * settings.eval_interval)
    return TrainingStop(reason, run.step, settings.steps, run.out_dir / STATE_FILE, exported, next_export, last_val,
                        len(run.records))


def train(recipe: Recipe, out_dir: Path, resume: bool = False, stop_after: int | None = None,
          show_progress: bool = True, threads: int | None = None) -> TrainingStop:
    """Run (or continue) the recipe up to its last step (or `stop_after`, or Ctrl-C, after which the state is
    saved); returns how it ended. Threads: `threads`, else the idle cores (threads.py)."""
    use_training_threads(threads)
    settings = recipe.train
    run = start_run(recipe, out_dir, resume, show_progress)
    print(describe(run), file=sys.stderr)
    train_ids = torch.from_numpy(run.train_split.ids.astype(np.int64))
    last_val = next((r for r in reversed(run.records) if r["kind"] == "val"), None)
    start_step = run.step
    end_step = settings.steps if stop_after is None else min(settings.steps, stop_after)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=settings.steps, desc="training",
               unit="step", disable=not show_progress, mininterval=1.0, dynamic_ncols=True)
    t0 = time.perf_counter()
    reason = "finished" if end_step == settings.steps else "stopped"
    with StopRequest() as stop:
        for _ in bar:
            last_val = take_step(run, train_ids, bar, last_val, end_step, (start_step, t0))
            if stop.requested and run.step < end_step:
                save_state(run)
                reason = "interrupted"
                break
    bar.close()
    return stop_report(run, reason, last_val)


def take_step(run: TrainingRun, train_ids: torch.Tensor, bar, last_val: dict | None, end_step: int,
              started: tuple[int, float]) -> dict | None:
    """One step, with its log line, evaluation, state and export when due; returns the last validation record."""
    settings = run.recipe.train
    start_step, t0 = started
    loss, lr = train_step(run, train_ids)
    done = run.step
    tok_s = (done - start_step) * settings.batch_size * settings.context / (time.perf_counter() - t0)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                    val=f"{last_val['nats_per_char']:.3f}" if last_val else "-", refresh=False)
    if done % LOG_INTERVAL == 0 or done == settings.steps:
        log_training(run, lr, tok_s, time.perf_counter() - t0)
    if done % settings.eval_interval == 0 or done == settings.steps:
        last_val = evaluate(run, final=done == settings.steps)
        record(run, last_val)
        bar.write(f"step {done}: validation {last_val['nats_per_char']:.4f} nats/char "
                  f"({last_val['nats_per_token']:.4f} nats/token)", file=sys.stderr)
        save_state(run)
        export(run)
    elif done == end_step:
        save_state(run)  # --stop-after: an interruption on purpose, resumable bit-identically
    return last_val
