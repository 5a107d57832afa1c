"""Llama 3's tokenizer: byte-level BPE ranks from `tokenizer.model`, run by tiktoken with Meta's split pattern.

The file is tiktoken's BPE format, one `base64(token_bytes) rank` per line. The 256 special tokens
come right after the base vocabulary (ids 128000..128255 for Meta's 128,000 ranks), in Meta's order.
"""

import codecs
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .errors import UserError, first_line
from .files import megabytes, regular_file_size

# Meta's pre-tokenizer split pattern (llama_models/llama3/tokenizer.py).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# tiktoken panics on very long inputs and is quadratic on long runs without a split point, so Meta
# encodes at most this many characters at a time, cut where whitespace and non-whitespace alternate.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACE_CHARS = 25_000

MAX_TOKENIZER_BYTES = 256 << 20  # Llama 3's is 2.2 MB; a file of gigabytes is not a tokenizer
REMOTE_TIMEOUT_S = 10  # a remote tokenizer (gs://, az://, https://) gets this long, then one sentence


def read_bpe_ranks(path: str) -> dict[bytes, int]:
    """tiktoken's own reader (`load_tiktoken_bpe`, as Meta and gpt-fast use), plus the checks it leaves out:
    at least one rank, and ranks 0..n-1 each used once (tiktoken silently keeps the last of two lines for
    the same token). Raises ValueError saying what is wrong."""
    try:
        ranks = load_tiktoken_bpe(path)
    except ValueError as err:  # a line that is not `base64(token) rank` (binascii.Error is a ValueError)
        raise ValueError(f"a line is not 'base64-token rank': {err}") from None
    if not ranks:
        raise ValueError("it holds no BPE ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("its ranks are not 0..n-1, each used once")
    return ranks


@dataclass(frozen=True)
class Tokenizer:
    """Llama 3's tokenizer.model (the defaults), or another byte-level BPE vocabulary (a GGUF file's,
    gguf_vocab.py) that names its own special tokens, BOS, stop tokens and chat format."""

    encoding: tiktoken.Encoding
    num_base_tokens: int
    specials: tuple[tuple[str, int], ...] | None = None  # None: Llama 3's 256, right after the base tokens
    bos: int | None = None  # None: <|begin_of_text|>
    stops: tuple[int, ...] | None = None  # None: Llama 3's STOP_TOKENS; the first is the end of text
    add_bos: bool = True  # whether a prompt starts with BOS (SmolLM2's vocabulary says not)
    chat_format: str | None = "llama3"  # chat.py's format; None: this vocabulary has no chat format we speak
    unencodable: "re.Pattern | None" = None  # characters the vocabulary has no bytes for: dropped, as Hugging Face does
    # None when every single byte is a rank (byte-level BPE: any text encodes); else the characters it can
    # encode (a character-level tokenizer, training/chars.py), which encode() holds the text to
    alphabet: frozenset[str] | None = None

    @property
    def n_words(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        if self.specials is not None:
            return dict(self.specials)
        return {name: self.num_base_tokens + i for i, name in enumerate(SPECIAL_TOKENS)}

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"] if self.bos is None else self.bos

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        if self.stops is not None:
            return self.stops
        return tuple(self.special_tokens[name] for name in STOP_TOKENS)

    def encode(self, text: str, bos: bool = True, eos: bool = False, allowed_special: set[str] | str = frozenset()) -> list[int]:
        """Text -> ids. Special-token strings in the text are encoded as plain text unless allowed. `bos`:
        a prompt's start, which gets BOS where the vocabulary asks for it (add_bos)."""
        if self.alphabet is not None:
            self.check_alphabet(text, allowed_special)
        ids = [self.bos_id] if bos and self.add_bos else []
        if self.unencodable is not None:
            text = self.unencodable.sub("", text)
        for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[start:start + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACE_CHARS):
                ids.extend(self.encode_piece(piece, allowed_special))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_piece(self, piece: str, allowed_special: set[str] | str) -> list[int]:
        try:
            return self.encoding.encode(piece, allowed_special=allowed_special, disallowed_special=())
        except BaseException as err:  # tiktoken panics (a BaseException) on bytes that no rank covers
            if type(err).__name__ != "PanicException":
                raise
            raise UserError("the text holds characters that this tokenizer's ranks cannot build (it lacks single-byte "
                            "ranks); write the text in its characters, or use a byte-level BPE tokenizer.") from None

    def check_alphabet(self, text: str, allowed_special: set[str] | str) -> None:
        """Refuse a character this tokenizer has no token for (tiktoken would panic, or worse, go on)."""
        unknown = set(text) - self.alphabet
        if not unknown:
            return
        allowed = self.special_tokens if allowed_special == "all" else allowed_special
        for name in allowed:  # allowed special tokens are no characters of the text
            text = text.replace(name, "")
        position = next((i for i, char in enumerate(text) if char not in self.alphabet), None)
        if position is not None:
            char = text[position]
            raise UserError(f"the text holds {char!r} (U+{ord(char):04X}, character {position + 1}), which this "
                            f"character-level tokenizer's {len(self.alphabet)} characters do not include; write the "
                            f"text in its characters (those of the corpus it was made from), or use a byte-level "
                            f"BPE tokenizer, which encodes any text.")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)


def split_long_runs(text: str, max_run: int):
    """Yield pieces of `text` in which no run of whitespace or of non-whitespace is longer than `max_run`."""
    run_len = 0
    run_is_space = text[0].isspace() if text else False
    piece_start = 0
    for i, char in enumerate(text):
        is_space = char.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield text[piece_start:i]
                piece_start, run_len = i, 1
    yield text[piece_start:]


def load_tokenizer(path: str | Path, what: str = "tokenizer file") -> Tokenizer:
    """The tokenizer in `path`: a local file, or a URL read within REMOTE_TIMEOUT_S. `what` names the source
    (a flag) in the messages."""
    path = str(path)
    if "://" in path:
        return tokenizer_from_bytes(read_remote(path, what), Path(path).name, f"{what} {path}")
    fix = "put Meta's tokenizer.model beside the checkpoint or pass --tokenizer FILE"
    size = regular_file_size(path, what, fix)
    if size > MAX_TOKENIZER_BYTES:
        raise UserError(f"{what} {path} is {megabytes(size)}, too big for a tokenizer (at most "
                        f"{megabytes(MAX_TOKENIZER_BYTES)}); {fix}.")
    return read_tokenizer(path, Path(path).name, f"{what} {path}")


def read_tokenizer(path: str, name: str, label: str) -> Tokenizer:
    """tiktoken's BPE ranks from the local file `path`; `label` names the source in a message."""
    try:
        ranks = read_bpe_ranks(path)
    except ValueError as err:
        raise UserError(f"{label} is not a tiktoken BPE tokenizer file ({err}); use the tokenizer.model that came with the weights.") from None
    except OSError as err:
        raise UserError(f"cannot read {label} ({err}); check the path or pass --tokenizer FILE.") from None
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    return Tokenizer(encoding, len(ranks), alphabet=encodable_characters(ranks))


def encodable_characters(ranks: dict[bytes, int]) -> frozenset[str] | None:
    """None when all 256 single bytes are ranks (any text encodes); else the characters tiktoken can build from
    the ranks: those whose UTF-8 bytes are a rank, and so are their first two, three bytes (training/chars.py)."""
    if all(bytes([b]) in ranks for b in range(256)):
        return None
    chars = set()
    for token in ranks:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a byte prefix of a longer character, or a byte of some other tokenizer's own
        if len(text) == 1 and all(token[:n] in ranks for n in range(2, len(token))):
            chars.add(text)
    return frozenset(chars)


def tokenizer_from_bytes(data: bytes, name: str = "tokenizer.model", label: str = "the tokenizer") -> Tokenizer:
    """A tokenizer from the bytes of a tokenizer.model file (read through tiktoken's own reader, from a file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.model"
        path.write_bytes(data)
        return read_tokenizer(str(path), name, label)


def read_remote(url: str, what: str) -> bytes:
    """The bytes at `url`, within REMOTE_TIMEOUT_S and MAX_TOKENIZER_BYTES. tiktoken would retry a cloud path
    forever (blobfile's backoff) and wait on a silent web server without limit; here both are bounded."""
    deadline = time.time() + REMOTE_TIMEOUT_S
    try:
        data = read_http(url, deadline) if url.startswith(("http://", "https://")) else read_blob(url, deadline)
    except Exception as err:  # network libraries raise many types; all mean "could not get it" here
        raise UserError(f"{what} {url} could not be read ({first_line(err, 160)}); check the URL and the network (a remote "
                        f"tokenizer gets {REMOTE_TIMEOUT_S} s), or download the file and pass its path.") from None
    if len(data) > MAX_TOKENIZER_BYTES:
        raise UserError(f"{what} {url} is more than {megabytes(MAX_TOKENIZER_BYTES)}, too big for a tokenizer; "
                        f"pass a tokenizer.model.")
    return data


def read_http(url: str, deadline: float) -> bytes:
    import requests  # tiktoken's own dependency; only a URL needs it

    chunks, size = [], 0
    with requests.get(url, stream=True, timeout=max(deadline - time.time(), 0.1)) as response:
        response.raise_for_status()
        for chunk in response.iter_content(1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_TOKENIZER_BYTES:
                break  # read_remote refuses it
            if time.time() > deadline:
                raise TimeoutError("the download did not finish")
    return b"".join(chunks)


def read_blob(url: str, deadline: float) -> bytes:
    import blobfile  # tiktoken's way to cloud storage (gs://, az://); only such a path needs it

    context = blobfile.create_context(retry_limit=3, connect_timeout=REMOTE_TIMEOUT_S, read_timeout=REMOTE_TIMEOUT_S,
                                      get_deadline=lambda: deadline,
                                      log_callback=lambda _message: None)
    with context.BlobFile(url, "rb") as f:
        return f.read(MAX_TOKENIZER_BYTES + 1)


class TextStream:
    """Turns generated token ids into text pieces, holding back the bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
