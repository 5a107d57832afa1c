"""A training recipe: model shape (params.json fields), tokenizer size, data and optimiser settings, in one JSON file.

{
  "model": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 64, ...},
  "tokenizer": {"bpe_ranks": 1024},         or {"kind": "char"}: one token per character of the corpus
  "data": {"corpus": "data/tinyshakespeare.txt", "val_fraction": 0.1},
  "train": {"context": 256, "batch_size": 16, "steps": 2000, "lr": 2e-3, ...},
  "generation": {"prompt": "ROMEO:\\n", ...}
}

`vocab_size` is not given: it is the tokenizer's size, BPE ranks + 256 special tokens (for "char", the
corpus's characters + 256: read from the corpus when the recipe is loaded).
"""

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..checkpoints.defaults import INT64_MAX, available_memory_bytes, generation_problem
from ..errors import UserError
from ..files import read_json, read_text
from ..params import ModelParams, params_from_dict
from ..tokenizer import NUM_SPECIAL_TOKENS
from .bpe import NUM_BYTE_TOKENS
from .chars import char_vocab

TOKENIZER_KINDS = ("bpe", "char")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "shakespeare.json"


@dataclass(frozen=True)
class TrainSettings:
    context: int = 256  # tokens per training window (the first one is <|begin_of_text|>'s prediction)
    batch_size: int = 16
    steps: int = 2000
    lr: float = 2e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # where the cosine ends, at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 1337
    eval_interval: int = 250  # steps between validation losses (and checkpoints)
    eval_windows: int = 64  # validation windows used at intermediate evaluations; the final one uses all
    init_std: float = 0.02
    dropout: float = 0.0  # training only: the share of activations zeroed (training/dropout.py); 0 adds nothing


@dataclass(frozen=True)
class Recipe:
    source: Path
    model: dict  # params.json fields without vocab_size
    bpe_ranks: int  # the tokenizer's ranks: BPE's, or (tokenizer_kind "char") the corpus's characters
    corpus: Path
    val_fraction: float
    train: TrainSettings
    generation: dict
    tokenizer_kind: str = "bpe"  # "bpe" (training/bpe.py) or "char" (training/chars.py)
    variant: str | None = None  # a lab variant's name (lab/variants.py); None: Llama 3 itself

    @property
    def params(self) -> ModelParams:
        return params_from_dict({**self.model, "vocab_size": self.bpe_ranks + NUM_SPECIAL_TOKENS})

    def to_dict(self) -> dict:
        """What a checkpoint remembers, to refuse resuming under a different recipe."""
        tokenizer = {"bpe_ranks": self.bpe_ranks} if self.tokenizer_kind == "bpe" else {"kind": self.tokenizer_kind}
        saved = {"model": self.model, "tokenizer": tokenizer, "data": {
            "corpus": str(self.corpus), "val_fraction": self.val_fraction}, "train": asdict(self.train)}
        return saved if self.variant is None else {**saved, "variant": self.variant}


def training_memory_bytes(params: ModelParams, train: TrainSettings) -> int:
    """A lower bound on what training takes: fp32 weights, gradients and AdamW's two moments, and one batch's
    fp32 logits with their gradient."""
    return 16 * params.parameter_count() + 8 * train.batch_size * train.context * params.vocab_size


def check_fits_in_memory(params: ModelParams, train: TrainSettings, bad) -> None:
    """Refuse a recipe whose model or batch cannot fit, by arithmetic, before anything is allocated."""
    needed, available = training_memory_bytes(params, train), available_memory_bytes()
    if needed > available:
        raise bad(f"training this model ({params.parameter_count():,} parameters) with train.batch_size "
                  f"{train.batch_size} x train.context {train.context} needs at least {needed / 1e9:,.1f} GB of "
                  f"memory, and {available / 1e9:,.1f} GB are available; make the model or the batch smaller")


def corpus_and_tokenizer(raw: dict, corpus_override: Path | None, bad) -> tuple[Path, str, int]:
    """The recipe's corpus path, tokenizer kind and number of ranks (for "char", counted in the corpus)."""
    tokenizer = raw.get("tokenizer", {})
    if not isinstance(tokenizer, dict) or set(tokenizer) - {"kind", "bpe_ranks"}:
        raise bad("\"tokenizer\" must be an object with \"bpe_ranks\" (byte-level BPE) or \"kind\": \"char\"")
    kind = tokenizer.get("kind", "bpe")
    if kind not in TOKENIZER_KINDS:
        raise bad(f"tokenizer.kind {kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    data = raw.get("data", {})
    if not isinstance(data, dict):
        raise bad("\"data\" must be an object with \"corpus\" and \"val_fraction\"")
    if not isinstance(data.get("corpus", ""), str):
        raise bad(f"data.corpus {data['corpus']!r} must be a path (a string)")
    corpus = Path(data.get("corpus", "data/tinyshakespeare.txt"))
    if corpus_override is not None:
        corpus = corpus_override
    elif not corpus.is_absolute():
        corpus = REPO_ROOT / corpus  # recipe paths are relative to the repository, wherever it runs from
    if kind == "char":
        if "bpe_ranks" in tokenizer:
            raise bad("tokenizer.bpe_ranks is for byte-level BPE; a \"char\" tokenizer takes its size from the "
                      "corpus, so drop bpe_ranks")
        bpe_ranks = len(char_vocab(read_text(corpus, "corpus (--corpus or data.corpus)")))
    else:
        bpe_ranks = tokenizer.get("bpe_ranks", 1024)
    if kind == "bpe" and (isinstance(bpe_ranks, bool) or not isinstance(bpe_ranks, int) or bpe_ranks < NUM_BYTE_TOKENS):
        raise bad(f"tokenizer.bpe_ranks {bpe_ranks!r} must be an integer >= {NUM_BYTE_TOKENS} (the single bytes)")
    return corpus, kind, bpe_ranks


def load_recipe(path: Path, corpus_override: Path | None = None) -> Recipe:
    raw = read_json(path, f"pass a recipe JSON such as {DEFAULT_RECIPE.relative_to(REPO_ROOT)}", what="--config")
    return recipe_from_raw(raw, path, corpus_override)


def recipe_from_raw(raw, path: Path, corpus_override: Path | None = None) -> Recipe:
    """The recipe a parsed recipe JSON describes, every field checked; `path` names it in the messages."""
    def bad(what: str) -> UserError:
        return UserError(f"--config {path}: {what}; fix the file (see {DEFAULT_RECIPE.relative_to(REPO_ROOT)}).")

    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise bad("it needs a \"model\" object with params.json fields")
    unknown = set(raw) - {"model", "tokenizer", "data", "train", "generation"}
    if unknown:
        raise bad(f"unknown section(s) {', '.join(sorted(unknown))}")
    model = dict(raw["model"])
    if "vocab_size" in model:
        raise bad("model.vocab_size comes from the tokenizer; set tokenizer.bpe_ranks instead")
    corpus, kind, bpe_ranks = corpus_and_tokenizer(raw, corpus_override, bad)
    try:
        params = params_from_dict({**model, "vocab_size": bpe_ranks + NUM_SPECIAL_TOKENS})
    except (ValueError, TypeError) as err:
        raise bad(f"the model is not a valid Llama 3 shape ({err})") from None

    val_fraction = raw.get("data", {}).get("val_fraction", 0.1)  # "data": an object (corpus_and_tokenizer)
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise bad(f"data.val_fraction {val_fraction!r} must be between 0 and 1")

    train_raw = raw.get("train", {})
    if not isinstance(train_raw, dict):
        raise bad("\"train\" must be an object of train settings")
    known = {f.name: f for f in fields(TrainSettings)}
    if set(train_raw) - set(known):
        raise bad(f"unknown train setting(s) {', '.join(sorted(set(train_raw) - set(known)))}")
    for name, value in train_raw.items():
        expected = int if known[name].type in (int, "int") else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (expected is int and not isinstance(value, int)):
            raise bad(f"train.{name} {value!r} must be a{'n integer' if expected is int else ' number'}")
    train = TrainSettings(**train_raw)
    for name in ("context", "batch_size", "steps", "eval_interval", "eval_windows"):
        if getattr(train, name) < 1:
            raise bad(f"train.{name} must be at least 1")
    if not 0 <= train.warmup_steps < train.steps:
        raise bad("train.warmup_steps must be between 0 and steps - 1")
    if not 0 < train.min_lr <= train.lr:
        raise bad("train.min_lr must be positive and at most train.lr")
    ranges = {"beta1": 0 <= train.beta1 < 1, "beta2": 0 <= train.beta2 < 1, "weight_decay": train.weight_decay >= 0,
              "grad_clip": train.grad_clip > 0, "init_std": train.init_std > 0, "seed": 0 <= train.seed <= INT64_MAX,
              "dropout": 0 <= train.dropout < 1}
    for name, in_range in ranges.items():  # AdamW and torch.manual_seed would raise deep inside otherwise
        if not in_range:
            raise bad(f"train.{name} {getattr(train, name)!r} is out of range (betas in [0, 1), weight_decay >= 0, "
                      f"grad_clip and init_std > 0, seed in 0..2**63-1, dropout in [0, 1))")
    check_fits_in_memory(params, train, bad)
    generation = raw.get("generation", {})
    if not isinstance(generation, dict) or generation_problem(generation):
        raise bad(f"generation ({generation_problem(generation) if isinstance(generation, dict) else 'not an object'}) "
                  f"is not what run.py takes: prompt, max_new_tokens, temperature, top_p, top_k")
    return Recipe(Path(path), model, bpe_ranks, corpus, float(val_fraction), train, generation, kind)
