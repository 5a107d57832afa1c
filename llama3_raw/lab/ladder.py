"""The ladder: Llama 3 and its variants trained on the same data, seed, steps and loop, then compared.

Every variant is one call of the project's own `train` (training/loop.py), in its own folder under
`OUT/runs/NAME`: the recipe is the lab's (training/recipes/lab.json, or lab_quick.json for --quick) with the
variant's change (training/variants.py). Nothing about training is written again here; the lab only reads
the runs' logs back and puts them side by side, in validation nats per character, so that the character
tokenizer compares with BPE. A run that was interrupted resumes where it stopped when the lab runs again
with the same --out; one that finished is read back, not trained again.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from ..files import check_writable_folder, read_json, read_text, write_json, write_text
from ..locks import writing_alone
from ..training import TrainingStop, train
from ..training.recipe import DEFAULT_RECIPE, Recipe, recipe_from_raw
from ..training.state import LOG_FILE, STATE_FILE, read_log
from ..training.variants import VARIANTS, Variant, variant_model
from .report import plot_curves, table_markdown

RECIPES = DEFAULT_RECIPE.parent
LAB_RECIPE = RECIPES / "lab.json"
QUICK_RECIPE = RECIPES / "lab_quick.json"
RESULTS_FILE, PLOT_FILE, TABLE_FILE = "lab.json", "lab.png", "lab.md"
SETTINGS_FILE = "lab_settings.json"  # what the runs under OUT/runs were started with
KV_BYTES = 2  # bf16, as inference keeps the cache


def variant_recipe(base: dict, source: Path, variant: Variant, corpus: Path | None) -> Recipe:
    """The lab recipe with the variant's change, checked like any recipe (the char tokenizer's size included)."""
    raw = {**base, "model": variant_model(variant, base["model"])}
    if variant.tokenizer_kind != "bpe":
        raw["tokenizer"] = {"kind": variant.tokenizer_kind}
    recipe = recipe_from_raw(raw, source, corpus)
    return replace(recipe, variant=None if variant.name == "llama3" else variant.name)


def kv_bytes_per_token(recipe: Recipe) -> int:
    """Keys and values of every layer for one position, in bf16: 2 x layers x kv heads x head_dim x 2 bytes."""
    params = recipe.params
    return 2 * params.n_layers * params.n_kv_heads * params.head_dim * KV_BYTES


def result_of(variant: Variant, recipe: Recipe, records: list[dict]) -> dict:
    """What the table and the picture need from one run's log."""
    vals = [r for r in records if r["kind"] == "val"]
    trains = [r for r in records if r["kind"] == "train"]
    samples = [r for r in records if r["kind"] == "sample"]
    final = vals[-1]
    return {
        "name": variant.name, "label": variant.label, "teaches": variant.teaches,
        "parameters": sum(_numel(shape) for shape in variant.weight_shapes(recipe.params).values()),
        "vocab_size": recipe.params.vocab_size, "n_layers": recipe.params.n_layers,
        "n_heads": recipe.params.n_heads, "n_kv_heads": recipe.params.n_kv_heads,
        "kv_cache_bytes_per_token": kv_bytes_per_token(recipe),
        "val_nats_per_char": final["nats_per_char"], "val_nats_per_token": final["nats_per_token"],
        "val_chars_per_token": final["chars"] / final["tokens"], "final_is_whole_split": bool(final.get("full")),
        "val_curve": [[r["step"], r["nats_per_char"]] for r in vals],
        "train_curve": [[r["step"], r["nats_per_char"]] for r in trains],
        "tokens_per_s": training_speed(trains, [r["step"] for r in vals], recipe),  # timing: not reproducible
        "sample": samples[-1]["text"] if samples else "",
    }


def training_speed(trains: list[dict], eval_steps: list[int], recipe: Recipe) -> float | None:
    """Tokens per second of the optimizer steps alone: over the log intervals that hold no evaluation (the
    log's own tokens_per_s counts the evaluations' time too, and a char model's take longer)."""
    tokens_per_step = recipe.train.batch_size * recipe.train.context
    steps = seconds = 0.0
    for before, after in zip(trains, trains[1:]):
        if not any(before["step"] <= e < after["step"] for e in eval_steps):
            steps += after["step"] - before["step"]
            seconds += after["elapsed_s"] - before["elapsed_s"]
    return round(steps * tokens_per_step / seconds) if seconds > 0 else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def claim_folder(out: Path, settings: dict) -> None:
    """`out` holds this lab's runs: a new folder, or one that a lab with the very same settings started (whose
    runs then resume or are read back). Another lab's folder is refused before anything is written."""
    check_writable_folder(out, "--out")
    path = out / SETTINGS_FILE
    if path.exists():
        if read_json(path, f"delete {out} or choose another --out", what="--out") != settings:
            raise UserError(f"--out {out} holds a lab run with other settings (recipe, steps, seed or corpus); "
                            f"choose another --out, or delete that folder to start over.")
        return
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder that holds other files, not a lab run; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def pick_variants(names: list[str] | None) -> list[Variant]:
    if not names:
        return list(VARIANTS.values())
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UserError(f"--variants {','.join(unknown)}: no such variant; pass some of {', '.join(VARIANTS)} "
                        f"(comma-separated).")
    return [VARIANTS[name] for name in dict.fromkeys(names)]


def run_lab(out: Path, recipe_path: Path = LAB_RECIPE, names: list[str] | None = None, steps: int | None = None,
            seed: int | None = None, corpus: Path | None = None, threads: int | None = 1,
            show_progress: bool = True) -> dict | TrainingStop:
    """Train every chosen variant (all of them by default) under `out`/runs, then write `out`/lab.json (the
    numbers), lab.png (the curves) and lab.md (the table). Returns what lab.json holds; the run's TrainingStop
    when Ctrl-C, SIGTERM or SIGHUP stopped it (its state is saved: the same command resumes it)."""
    variants = pick_variants(names)
    base = read_json(recipe_path, "pass a lab recipe JSON such as training/recipes/lab.json", what="--config")
    if not isinstance(base, dict) or not isinstance(base.get("model"), dict):
        recipe_from_raw(base, recipe_path)  # says what is wrong with it
    base = json.loads(json.dumps(base))  # a copy to change
    train_raw = base.setdefault("train", {})
    if not isinstance(train_raw, dict):
        recipe_from_raw(base, recipe_path)
    if steps is not None:
        train_raw["steps"] = steps
        train_raw["warmup_steps"] = min(train_raw.get("warmup_steps", 0), steps - 1)
        train_raw["eval_interval"] = min(train_raw.get("eval_interval", steps), steps)
    if seed is not None:
        train_raw["seed"] = seed
    recipes = [variant_recipe(base, recipe_path, variant, corpus) for variant in variants]  # all checked first
    if not read_text(recipes[0].corpus, "corpus (--corpus or data.corpus)"):  # before --out is touched
        raise UserError(f"the corpus {recipes[0].corpus} is empty; pass a text file with content.")
    settings = {"recipe": base, "corpus": str(recipes[0].corpus)}
    with writing_alone(out, "--out"):  # a second lab on the same --out is refused at once, before it trains
        return run_variants(out, recipe_path, settings, variants, recipes, threads, show_progress)


def run_variants(out: Path, recipe_path: Path, settings: dict, variants: list[Variant], recipes: list[Recipe],
                 threads: int | None, show_progress: bool) -> dict | TrainingStop:
    claim_folder(out, settings)
    results = []
    for i, (variant, recipe) in enumerate(zip(variants, recipes), start=1):
        run_dir = out / "runs" / variant.name
        print(f"[{i}/{len(variants)}] {variant.name}: {variant.label} -- {variant.teaches}", file=sys.stderr,
              flush=True)
        stop = train(recipe, run_dir, resume=(run_dir / STATE_FILE).is_file(), show_progress=show_progress,
                     threads=threads)
        if stop.reason == "interrupted":
            print(f"lab interrupted in {variant.name} at step {stop.step}; run the same command again to go on "
                  f"from there.", file=sys.stderr)
            return stop
        results.append(result_of(variant, recipe, read_log(run_dir / LOG_FILE, stop.step)))
    lab = {"recipe": str(recipe_path.name), "seed": recipes[0].train.seed, "steps": recipes[0].train.steps,
           "settings": {k: v for k, v in recipes[0].to_dict().items() if k != "variant"},
           "variants": results}
    write_json(out / RESULTS_FILE, lab)
    plot_curves(lab, out / PLOT_FILE)
    write_text(out / TABLE_FILE, table_markdown(lab))
    return lab
