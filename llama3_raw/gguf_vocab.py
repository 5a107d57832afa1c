"""A GGUF file's vocabulary (tokenizer.ggml.*) as a tiktoken tokenizer, the same Tokenizer as Llama 3's own.

A byte-level BPE vocabulary in GGUF ("tokenizer.ggml.model": "gpt2") lists its tokens as text in GPT-2's
byte alphabet: each of the 256 byte values stands for one printable character (the printable Latin-1 bytes
for themselves, the others for U+0100 onwards, in order). Decoding that alphabet gives each token's bytes;
tiktoken's mergeable ranks are those bytes with the token's id as its rank -- byte-level BPE vocabularies
(Llama 3's, SmolLM2's) number their tokens in the order of their merges, which is what a rank means, and
tests/test_gguf.py checks the encodings against Llama 3's tokenizer.model and transformers' tokenizer.
CONTROL and USER_DEFINED tokens are the special tokens.

The pre-tokenizer (`tokenizer.ggml.pre`) decides how text is split before BPE; this reads the two it knows:
    llama-bpe   Llama 3's split pattern (tokenizer.SPLIT_PATTERN), so a Llama 3 GGUF encodes as tokenizer.model does
    smollm      GPT-2's pattern with every digit alone (llama.cpp's and Hugging Face's SmolLM2 tokenizer)
"""

import re
from pathlib import Path

import tiktoken

from .errors import UserError
from .tokenizer import SPLIT_PATTERN, Tokenizer

SPLIT_PATTERNS = {
    "llama-bpe": SPLIT_PATTERN,
    "smollm": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp's token types (gguf.TokenType)
LLAMA3_CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
STOP_NAMES = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
FIX = "pass --tokenizer FILE with the model's tokenizer.model, or another GGUF"


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + i)
    return {char: b for b, char in chars.items()}


def gguf_tokenizer(metadata: dict, path: Path) -> Tokenizer:
    """The tokenizer the GGUF metadata describes; one sentence naming the file for anything it cannot be."""
    def refuse(why: str):
        raise UserError(f"{path}: the vocabulary {why}; {FIX}.")

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        refuse(f"is {model!r} (tokenizer.ggml.model), not the byte-level BPE ('gpt2') of Llama 3")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in SPLIT_PATTERNS:
        refuse(f"uses the pre-tokenizer {pre!r}, which this project does not know (it knows "
               f"{', '.join(SPLIT_PATTERNS)})")
    tokens = metadata.get("tokenizer.ggml.tokens")
    types = metadata.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        refuse("has no list of tokens (tokenizer.ggml.tokens)")
    if types is None or getattr(types, "ndim", 0) != 1 or len(types) != len(tokens) or types.dtype.kind not in "iu":
        refuse(f"has no token type for each of its {len(tokens)} tokens (tokenizer.ggml.token_type)")
    alphabet = byte_alphabet()
    ranks, specials = {}, {}
    for token_id, (text, kind) in enumerate(zip(tokens, types.tolist())):
        if kind in (CONTROL, USER_DEFINED):
            specials[text] = token_id
            continue
        try:
            data = bytes(alphabet[char] for char in text)
        except KeyError:
            refuse(f"token {token_id} ({text!r}) is not in the byte-level alphabet")
        if data in ranks:
            refuse(f"token {token_id} repeats token {ranks[data]}")
        ranks[data] = token_id
    unencodable = unencodable_characters([b for b in range(256) if bytes([b]) not in ranks], refuse)
    bos = token_id_setting(metadata, "tokenizer.ggml.bos_token_id", len(tokens), refuse)
    eos = token_id_setting(metadata, "tokenizer.ggml.eos_token_id", len(tokens), refuse)
    stops = (eos, *[specials[name] for name in STOP_NAMES if name in specials and specials[name] != eos])
    try:
        encoding = tiktoken.Encoding(name=path.name, pat_str=SPLIT_PATTERNS[pre], mergeable_ranks=ranks,
                                     special_tokens=specials)
    except ValueError as err:
        refuse(f"is not one tiktoken accepts ({err})")
    chat = "llama3" if all(name in specials for name in LLAMA3_CHAT_TOKENS) else None
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe")
    return Tokenizer(encoding, len(ranks), specials=tuple(specials.items()), bos=bos, stops=stops, add_bos=bool(add_bos),
                     chat_format=chat, unencodable=unencodable)


# A byte that can lead UTF-8 text and the characters it leads; bytes C0, C1 and F5..FF never occur in UTF-8.
RARE_LEAD_BYTES = {0xF1: (0x40000, 0x7FFFF), 0xF2: (0x80000, 0xBFFFF), 0xF3: (0xC0000, 0xFFFFF), 0xF4: (0x100000, 0x10FFFF)}
NEVER_IN_UTF8 = (0xC0, 0xC1, *range(0xF5, 0x100))


def unencodable_characters(missing: list[int], refuse) -> "re.Pattern | None":
    """The characters whose UTF-8 needs a byte the vocabulary lacks (SmolLM2's lacks a few control characters
    and the lead bytes of unassigned planes), as a pattern that encode() drops them by -- tiktoken cannot
    encode them at all, and Hugging Face's tokenizer drops them too. A vocabulary that lacks a byte of
    ordinary text (a letter, a continuation byte) is refused."""
    drop = []
    for b in missing:
        if b < 0x20 or b == 0x7F:
            drop.append(re.escape(chr(b)))
        elif b in RARE_LEAD_BYTES:
            low, high = RARE_LEAD_BYTES[b]
            drop.append(f"{chr(low)}-{chr(high)}")
        elif b not in NEVER_IN_UTF8:
            refuse(f"lacks the single byte {b:#04x}, which byte-level BPE needs for ordinary text")
    return re.compile(f"[{''.join(drop)}]") if drop else None


def token_id_setting(metadata: dict, key: str, n_tokens: int, refuse) -> int:
    value = metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        refuse(f"names no valid token as {key} ({value!r})")
    return value
