"""A character-level tokenizer -- the seeds' `stoi` / `itos` -- written in Meta's tokenizer.model format.

The seeds build it by hand: `chars = sorted(set(text))`, `stoi = {c: i for i, c in enumerate(chars)}`,
`itos = {i: c for i, c in enumerate(chars)}`. Here rank i of the file is the UTF-8 bytes of `chars[i]`, so
`stoi[c]` is the rank tiktoken gives `c`, and the 256 special tokens follow the last rank as in Meta's file:
run.py, chat, inspect, compare and Meta's own `Tokenizer` read it unchanged.

tiktoken builds every token out of single bytes by merging pairs whose concatenation is a rank. A character of
one or two UTF-8 bytes is reached that way; one of three or four bytes also needs its first two (and three)
bytes as ranks, so those prefixes follow the characters in the file. Nothing ever ends on one: each prefix
merges on into its character. (Tiny Shakespeare is ASCII: 65 characters, 65 ranks.)

With no single bytes of its own, such a tokenizer cannot encode a character outside its alphabet:
`Tokenizer.encode` refuses one with a sentence that names it (tokenizer.py), never a silent wrong id.
"""

from pathlib import Path

from ..errors import UserError
from ..files import check_output_file, read_text
from .bpe import write_bpe_file


def char_vocab(text: str) -> list[bytes]:
    """The tokenizer's ranks in order: every distinct character of `text`, sorted by code point (the seeds'
    `sorted(set(text))`), then the byte prefixes that tiktoken needs to build the longer ones."""
    chars = sorted(set(text))
    tokens = [char.encode("utf-8") for char in chars]
    prefixes = sorted({token[:n] for token in tokens for n in range(2, len(token))})
    return tokens + prefixes


def train_char_tokenizer_file(input_path: Path, output: Path) -> list[bytes]:
    """`train_tokenizer --kind char`: the input's characters as a tokenizer.model (written atomically)."""
    check_output_file(output, "--output")
    text = read_text(input_path, "--input")
    if not text:
        raise UserError(f"--input {input_path} is empty; a character-level tokenizer needs text to take its "
                        f"characters from.")
    vocab = char_vocab(text)
    write_bpe_file(vocab, output)
    return vocab
