"""The training loop: set up (or resume) a run, take one optimizer step at a time, evaluate and export.

Training runs the very `forward` that inference runs (through objective.batch_loss), on a flat dict of
fp32 leaf tensors with Meta's key names. One command does everything: learn the BPE tokenizer on the
training split, encode the text (cached), train with AdamW, and write the result in Meta's checkpoint
format (export.py), which `python run.py --ckpt-dir DIR` (or Meta's own code) loads unchanged.
"""

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import check_writable_folder
from ..locks import writing_alone
from ..parallel import SINGLE_PROCESS, Ranks
from ..threads import use_training_threads
from ..params import ModelParams
from ..tokenizer import Tokenizer, tokenizer_from_bytes
from .data import Split, prepare_data
from .data_parallel import check_batch_shares, from_rank_zero, rows_of_rank, sum_gradients, sum_over_ranks
from .dropout import row_dropout
from .evaluation import autocast, sample_text, validation_record
from .export import export_checkpoint
from .loss_curve import plot_loss_curve
from .objective import batch_loss, init_weights, learning_rate, param_groups, sample_batch
from .recipe import Recipe
from .stops import StopRequest, TrainingStop, stop_report
from .state import LOG_FILE, STATE_FILE, append_log, load_train_state, read_log, save_train_state, write_log
from .variants import Variant, variant_named

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
    ranks: Ranks = SINGLE_PROCESS  # data parallel: every rank holds all of the above, rank 0 alone writes
    device: str = "cpu"

    @property
    def variant(self) -> Variant:
        """Llama 3, or the lab variant the recipe names (training/variants.py)."""
        return variant_named(self.recipe.variant)

    @property
    def writes(self) -> bool:
        return self.ranks.rank == 0

    @property
    def chars_per_token(self) -> float:
        return self.train_split.chars / len(self.train_split.ids)


def run_files_bytes(params: ModelParams) -> int:
    """About what a run writes to --out: its state (fp32 weights and AdamW's two moments), a second copy of
    it while the new one replaces the old, and the bf16 export."""
    return (2 * 12 + 2) * params.parameter_count() + (1 << 20)


def read_saved_state(recipe: Recipe, out_dir: Path, resume: bool) -> dict | None:
    """The interrupted run's state (--resume), or None for a new run; refuses to start over an existing run."""
    check_writable_folder(out_dir, "--out", run_files_bytes(recipe.params))  # before the tokenizer is learned
    state_path = out_dir / STATE_FILE
    state = load_train_state(state_path, recipe) if resume else None
    if state is None and state_path.exists():
        raise UserError(f"--out {out_dir} already holds a training run ({STATE_FILE}); pass --resume to continue "
                        f"it, or choose another --out.")
    return state


def start_run(recipe: Recipe, out_dir: Path, resume: bool, show_progress: bool, ranks: Ranks = SINGLE_PROCESS,
              device: str = "cpu") -> TrainingRun:
    """A new run from the recipe's seed, or the interrupted one in `out_dir` exactly where it stopped.
    Rank 0 reads the state, the corpus and learns the tokenizer; every other rank gets them from it, and
    needs neither --out nor the corpus (on another machine: neither is read nor written there)."""
    settings, params = recipe.train, recipe.params
    check_batch_shares(settings.batch_size, ranks, recipe.source)
    state = prepared = None
    if ranks.rank == 0:
        state = read_saved_state(recipe, out_dir, resume)
        prepared = prepare_data(recipe, state, show_progress)
    state, (tokenizer_bytes, train_split, val_split) = from_rank_zero((state, prepared), ranks)
    tokenizer = tokenizer_from_bytes(tokenizer_bytes)
    generator = torch.Generator().manual_seed(settings.seed)  # on the CPU wherever the model is: the same batches
    shapes = variant_named(recipe.variant).weight_shapes(params)
    weights = {k: w.detach().to(device).requires_grad_(True)
               for k, w in init_weights(params, settings, generator, shapes).items()}
    optimizer = torch.optim.AdamW(param_groups(weights, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2), eps=1e-8)
    run = TrainingRun(recipe, out_dir, tokenizer, tokenizer_bytes, train_split, val_split, weights, optimizer,
                      generator, step=0, running={"loss_sum": 0.0, "count": 0}, records=[], ranks=ranks, device=device)
    if state is not None:
        with torch.no_grad():
            for key, tensor in weights.items():
                tensor.copy_(state["weights"][key])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        run.step, run.running = state["step"], dict(state["running"])
        run.records = read_log(out_dir / LOG_FILE, run.step) if run.writes else []
    if run.writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_log(out_dir / LOG_FILE, run.records)
    return run


def train_step(run: TrainingRun, train_ids: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on a fresh random batch; returns (loss in nats per token, learning rate).

    Every rank draws the same global batch and trains on its rows; its loss is weighted by its share of the
    rows, so the gradients summed over the ranks are the whole batch's (data_parallel.py)."""
    settings = run.recipe.train
    lr = learning_rate(run.step, settings)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, targets = sample_batch(train_ids, settings.context, settings.batch_size, run.tokenizer.bos_id,
                                   run.generator)  # (B, C) each: the global batch
    rows = rows_of_rank(settings.batch_size, run.ranks)
    dropout = row_dropout(settings.dropout, settings.seed, run.step, rows, run.device)
    with autocast(run.device):
        loss = batch_loss(run.weights, run.recipe.params, inputs[rows.start:rows.stop].to(run.device),
                          targets[rows.start:rows.stop].to(run.device), dropout=dropout, swap=run.variant.swap)
        loss = loss * (len(rows) / settings.batch_size)  # one process: * 1.0, exactly today's loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sum_gradients(run.weights, run.ranks)
    torch.nn.utils.clip_grad_norm_(list(run.weights.values()), settings.grad_clip)
    run.optimizer.step()
    run.step += 1
    batch_mean = sum_over_ranks(loss.item(), run.ranks, run.device)
    run.running["loss_sum"] += batch_mean
    run.running["count"] += 1
    return batch_mean, lr


def log_training(run: TrainingRun, lr: float, tok_s: float, elapsed_s: float) -> None:
    """One train line: the mean loss since the last one."""
    mean = run.running["loss_sum"] / run.running["count"]
    record(run, {"kind": "train", "step": run.step, "nats_per_token": mean, "nats_per_char": mean / run.chars_per_token,
                 "lr": lr, "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed_s, 1),
                 "world_size": run.ranks.world_size})
    run.running = {"loss_sum": 0.0, "count": 0}


def record(run: TrainingRun, line: dict) -> None:
    if run.writes:
        run.records.append(line)
        append_log(run.out_dir / LOG_FILE, line)


def evaluate(run: TrainingRun, final: bool) -> dict:
    """Validation loss: the first eval_windows windows of the split, or (final) all of it."""
    return validation_record(run.weights, run.recipe.params, run.val_split, run.tokenizer, run.recipe.train,
                             run.step, final, run.ranks, run.device, run.variant.swap)


def sample(run: TrainingRun) -> dict:
    """A short sample from the recipe's prompt (rank 0 only: the others go on to the next step's batch)."""
    text = sample_text(run.weights, run.recipe.params, run.tokenizer, run.recipe.generation, run.recipe.train,
                       run.device, run.variant.swap)
    return {"kind": "sample", "step": run.step, "text": text}


def save_state(run: TrainingRun) -> None:
    if not run.writes:
        return
    save_train_state(run.out_dir / STATE_FILE, run.recipe, run.step, run.running, run.weights, run.optimizer,
                     run.generator, run.tokenizer_bytes)


def export(run: TrainingRun) -> None:
    """The model as it is now, in Meta's format, with its loss curve: runnable at every evaluation."""
    recipe, params = run.recipe, run.recipe.params
    if not run.writes or not run.variant.is_llama3:  # a variant's other arithmetic would not run as Llama 3
        return
    generation = {**recipe.generation, "context_len": recipe.train.context}  # run.py and score stay within it
    export_checkpoint(run.out_dir, run.weights, params, run.tokenizer_bytes, generation)
    plot_loss_curve(run.records, run.out_dir / CURVE_FILE,
                    f"Llama 3 on {recipe.corpus.name}: {params.parameter_count() / 1e6:.1f}M parameters")


def describe(run: TrainingRun) -> str:
    params, train_split = run.recipe.params, run.train_split
    ranks = f"; {run.ranks.world_size} ranks, {len(rows_of_rank(run.recipe.train.batch_size, run.ranks))} rows each" \
        if run.ranks.world_size > 1 else ""
    return (f"model: {params.parameter_count() / 1e6:.2f}M parameters ({params.n_layers} layers, dim {params.dim}, "
            f"{params.n_heads} heads / {params.n_kv_heads} kv heads, vocab {params.vocab_size}); "
            f"data: {len(train_split.ids)} train / {len(run.val_split.ids)} validation tokens "
            f"({run.chars_per_token:.2f} chars/token); {run.device}, {torch.get_num_threads()} threads{ranks}")


def evaluate_and_save(run: TrainingRun, final: bool) -> dict:
    """Validation loss (every rank scores its share), then rank 0 samples, saves the state and exports."""
    val = evaluate(run, final)
    record(run, val)
    tqdm.write(f"step {run.step}: validation {val['nats_per_char']:.4f} nats/char "
               f"({val['nats_per_token']:.4f} nats/token)", file=sys.stderr)
    if run.writes:
        line = sample(run)
        record(run, line)
        tqdm.write(f"sample at step {run.step}:\n{line['text']}\n", file=sys.stderr)
    save_state(run)
    export(run)
    return val


def train(recipe: Recipe, out_dir: Path, resume: bool = False, stop_after: int | None = None,
          show_progress: bool = True, threads: int | None = None, ranks: Ranks = SINGLE_PROCESS,
          device: str = "cpu") -> TrainingStop:
    """Run (or continue) the recipe up to its last step (or `stop_after`, or Ctrl-C, SIGTERM or SIGHUP, after
    which the step under way is finished and the state saved); returns how it ended. Under torchrun every rank calls this with its `ranks`; rank 0 alone writes.
    Threads: `threads`, else threads.py's default for training. While it runs, no other process can write
    `out_dir` (files.writing_alone): a second run given it is refused at once."""
    with writing_alone(out_dir, "--out") if ranks.rank == 0 else contextlib.nullcontext():
        return train_alone(recipe, out_dir, resume, stop_after, show_progress, threads, ranks, device)


def train_alone(recipe: Recipe, out_dir: Path, resume: bool, stop_after: int | None, show_progress: bool,
                threads: int | None, ranks: Ranks, device: str) -> TrainingStop:
    use_training_threads(threads)
    settings = recipe.train
    run = start_run(recipe, out_dir, resume, show_progress, ranks, device)
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
            if stop.agreed(run.ranks, run.device) and run.step < end_step:
                save_state(run)
                reason = "interrupted"
                break
    bar.close()
    return stop_report(run, reason, last_val, stop.name if reason == "interrupted" else None)


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
        last_val = evaluate_and_save(run, final=done == settings.steps)
    elif done == end_step:
        save_state(run)  # --stop-after: an interruption on purpose, resumable bit-identically
    return last_val
