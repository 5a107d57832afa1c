"""The BPE trainer against an independent slow BPE, and its file against tiktoken and Meta's own Tokenizer."""

from pathlib import Path

import pytest
import regex

from llama3_raw.tokenizer import SPLIT_PATTERN, load_tokenizer
from llama3_raw.training.bpe import learn_bpe, train_tokenizer_file

REPO = Path(__file__).resolve().parent.parent
SMALL_TEXT = (REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:6000]
VARIED_TEXTS = [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "tabs\tand   spaces    and\n\n\nnewlines  \r\n  ",
    "emoji 🎭🎭 and CJK 莎士比亚 and accents: café, naïve, Ærø",
    "numbers 1234567 and 3.14159, 'tis, 'll, I'M, 've",
    "<|begin_of_text|> is plain text here",
    "",
    " ",
    "a" * 300,
]


def reference_bpe(text: str, vocab_size: int) -> tuple[list[bytes], list[list[int]]]:
    """Textbook BPE written independently of the trainer: every step recounts all adjacent pairs over every
    chunk occurrence (no unique-chunk weighting, no incremental updates), merges the most frequent pair
    (ties: smallest token ids), and reuses an existing token when the merged bytes already are one."""
    vocab = [bytes([b]) for b in range(256)]
    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(SPLIT_PATTERN, text)]
    while len(vocab) < vocab_size:
        counts: dict[tuple[int, int], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        merged = vocab[a] + vocab[b]
        if merged in vocab:
            new_id = vocab.index(merged)
        else:
            new_id = len(vocab)
            vocab.append(merged)
        new_words = []
        for word in words:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return vocab, words


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "small.model"
    source = path.with_suffix(".txt")
    source.write_text(SMALL_TEXT, encoding="utf-8")
    vocab = train_tokenizer_file(source, 256 + 120, path, show_progress=False)
    return vocab, path


def test_merges_equal_slow_reference(trained):
    vocab, _ = trained
    expected, _ = reference_bpe(SMALL_TEXT, 256 + 120)
    assert len(vocab) == 256 + 120
    assert vocab == expected


def test_tiktoken_reproduces_the_training_segmentation(trained):
    """tiktoken merges by rank; on the training text that must give exactly the trainer's chunks' tokens."""
    _, path = trained
    tokenizer = load_tokenizer(path)
    _, words = reference_bpe(SMALL_TEXT, 256 + 120)
    expected = [token for word in words for token in word]
    assert tokenizer.encode(SMALL_TEXT, bos=False) == expected


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_round_trip(trained, text):
    tokenizer = load_tokenizer(trained[1])
    assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text


def test_meta_tokenizer_agrees(trained):
    """Meta's reference Tokenizer (llama_models) reads the same file; both must give identical ids."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    ours = load_tokenizer(trained[1])
    meta = MetaTokenizer(Path(trained[1]))
    assert meta.n_words == ours.n_words == 256 + 120 + 256
    assert meta.bos_id == ours.bos_id == 256 + 120  # specials right after the BPE ranks
    for text in VARIED_TEXTS + [SMALL_TEXT]:
        assert ours.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)


def test_zero_merges_is_pure_bytes(tmp_path):
    source = tmp_path / "t.txt"
    source.write_text(SMALL_TEXT, encoding="utf-8")
    vocab = train_tokenizer_file(source, 256, tmp_path / "bytes.model", show_progress=False)
    assert vocab == [bytes([b]) for b in range(256)]
    tokenizer = load_tokenizer(tmp_path / "bytes.model")
    text = VARIED_TEXTS[2]
    assert tokenizer.encode(text, bos=False) == list(text.encode("utf-8"))  # the UTF-8 bytes themselves


def test_deterministic():
    assert learn_bpe(SMALL_TEXT, 300) == learn_bpe(SMALL_TEXT, 300)


@pytest.fixture
def run_cli(cli):
    """`python -m llama3_raw.train_tokenizer ARGS`, in this process (helpers.call)."""
    from llama3_raw import train_tokenizer

    return lambda *args: cli(*args, entry=train_tokenizer.main, cwd=REPO)


def test_vocab_below_256_is_an_error(tmp_path, run_cli):
    source = tmp_path / "t.txt"
    source.write_text(SMALL_TEXT, encoding="utf-8")
    out = tmp_path / "out.model"
    result = run_cli("--input", source, "--vocab-size", 255, "--output", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --vocab-size 255") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("make_input", ["missing", "binary"])
def test_unreadable_input_is_an_error(tmp_path, make_input, run_cli):
    source = tmp_path / "t.txt"
    if make_input == "binary":
        source.write_bytes(b"\xff\xfe\x00bad")
    out = tmp_path / "out.model"
    out.write_text("keep me")
    result = run_cli("--input", source, "--vocab-size", 300, "--output", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --input") and result.stderr.count("\n") == 1
    assert out.read_text() == "keep me"  # nothing on disk damaged
