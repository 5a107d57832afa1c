"""The training text: a character split into train / validation, encoded once and cached as numpy token ids."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..tokenizer import Tokenizer

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
