"""The training text: a character split into train / validation, encoded once and cached as numpy token ids,
with the tokenizer that encodes it (learned on the training split, or the resumed run's)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_write, read_text
from ..tokenizer import Tokenizer, tokenizer_from_bytes
from .bpe import bpe_file_text, learn_bpe
from .chars import char_vocab
from .recipe import Recipe

CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache"  # git-ignored


@dataclass(frozen=True)
class Split:
    text: str
    ids: np.ndarray  # (N,) token ids of `text`, without <|begin_of_text|>

    @property
    def chars(self) -> int:
        return len(self.text)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First (1 - val_fraction) of the characters train, the rest validation: the split everyone compares on."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def encode_cached(text: str, tokenizer: Tokenizer, tokenizer_bytes: bytes, cache_dir: Path = CACHE_DIR) -> np.ndarray:
    """tokenizer.encode(text), from a cache file keyed on the tokenizer's and the text's bytes."""
    key = hashlib.sha256(hashlib.sha256(tokenizer_bytes).digest() + text.encode("utf-8")).hexdigest()[:32]
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    ids = np.asarray(tokenizer.encode(text, bos=False), dtype=np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, ids))
    return ids


def load_splits(text: str, val_fraction: float, tokenizer: Tokenizer, tokenizer_bytes: bytes) -> tuple[Split, Split]:
    train_text, val_text = split_text(text, val_fraction)
    return (Split(train_text, encode_cached(train_text, tokenizer, tokenizer_bytes)),
            Split(val_text, encode_cached(val_text, tokenizer, tokenizer_bytes)))


def learn_tokenizer(train_text: str, bpe_ranks: int, show_progress: bool) -> bytes:
    """Learn the BPE ranks on the training split only (the validation text stays unseen): the tokenizer.model
    file, which run.py will load through the project's tokenizer."""
    return bpe_file_text(learn_bpe(train_text, bpe_ranks, show_progress)).encode("ascii")


def prepare_data(recipe: Recipe, state: dict | None, show_progress: bool) -> tuple[bytes, Split, Split]:
    """The tokenizer (learned now, or the resumed run's) and both splits encoded, checked against the context."""
    text = read_text(recipe.corpus, "corpus (--corpus or data.corpus)")
    if not text:
        raise UserError(f"the corpus {recipe.corpus} is empty; pass a text file with content.")
    if state is None:
        train_text = text[:int(len(text) * (1 - recipe.val_fraction))]
        if recipe.tokenizer_kind == "char":  # the alphabet of the whole corpus, as the seeds take it: the
            tokenizer_bytes = bpe_file_text(char_vocab(text)).encode("ascii")  # validation text must encode
        else:
            tokenizer_bytes = learn_tokenizer(train_text, recipe.bpe_ranks, show_progress)
    else:
        tokenizer_bytes = bytes(state["tokenizer"].numpy())
    train_split, val_split = load_splits(text, recipe.val_fraction, tokenizer_from_bytes(tokenizer_bytes), tokenizer_bytes)
    context = recipe.train.context
    for name, split in (("training", train_split), ("validation", val_split)):
        if len(split.ids) < context + 1:
            raise UserError(f"--config {recipe.source}: train.context {context} is longer than the {name} "
                            f"split ({len(split.ids)} tokens); lower train.context or use a bigger corpus.")
    return tokenizer_bytes, train_split, val_split
