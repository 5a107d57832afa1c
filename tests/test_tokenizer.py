"""Our tokenizer against Meta's own (llama_models' Tokenizer over the official tokenizer.model)."""

import pytest
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from helpers import FORTY_TWO_PROMPT, OFFICIAL_TOKENIZER
from llama3_raw import UserError, load_tokenizer
from llama3_raw.tokenizer import TextStream

TEXTS = [
    "Hello, world! It's a fine day, isn't it? I'll be there; we've done it.",
    "def forward(x):\n    return x @ w.T  # (seq, dim)\n\tif a != b:\r\n        pass\n",
    "Emoji: 🦙🔥👩‍👩‍👧‍👦 and flags 🇫🇷 — done ✓",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "Ünïcödé àçcénts, Ελληνικά, русский текст, עברית, العربية",
    "lots    of   spaces\n\n\n\n        and\t\t\ttabs   \n   ",
    " " * 300 + "x" + "\n" * 50,
    "numbers 1234567890 3.14159 1,000,000 and 2024-11-25",
    "special strings as text: <|begin_of_text|> <|eot_id|> <|start_header_id|>user<|end_header_id|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer(OFFICIAL_TOKENIZER), MetaTokenizer(OFFICIAL_TOKENIZER)


def test_42_prompt_ids(tokenizers):
    ours, _ = tokenizers
    # Ids given in the project's issue, from Meta's tokenizer.
    assert ours.encode(FORTY_TWO_PROMPT, bos=True) == [
        128000, 1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220]
    assert ours.decode([2983]) == "42"


def test_special_token_ids(tokenizers):
    ours, meta = tokenizers
    assert ours.n_words == meta.n_words == 128256
    assert ours.special_tokens == meta.special_tokens
    assert ours.special_tokens["<|begin_of_text|>"] == 128000
    assert ours.special_tokens["<|end_of_text|>"] == 128001
    assert ours.special_tokens["<|start_header_id|>"] == 128006
    assert ours.special_tokens["<|end_header_id|>"] == 128007
    assert ours.special_tokens["<|eom_id|>"] == 128008
    assert ours.special_tokens["<|eot_id|>"] == 128009
    assert ours.stop_ids == (128001, 128008, 128009) == tuple(meta.stop_tokens)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True)])
def test_same_ids_as_meta_and_round_trip(tokenizers, text, bos, eos):
    ours, meta = tokenizers
    ids = ours.encode(text, bos=bos, eos=eos)
    assert ids == meta.encode(text, bos=bos, eos=eos)
    body = ids[int(bos): len(ids) - int(eos)]
    assert ours.decode(body) == text


def test_special_tokens_when_allowed(tokenizers):
    ours, meta = tokenizers
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = ours.encode(text, bos=False, allowed_special="all")
    assert ids == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert 128006 in ids and 128009 in ids


def test_very_long_input_without_whitespace(tokenizers):
    ours, meta = tokenizers
    text = "a" * 60_000 + " " + "b1" * 20_000 + " " * 30_000 + "end"
    assert ours.encode(text, bos=False) == meta.encode(text, bos=False, eos=False)


def test_text_stream_never_splits_a_character(tokenizers):
    ours, _ = tokenizers
    text = "llama 🦙 中文 ok"
    stream = TextStream(ours)
    pieces = [stream.push(i) for i in ours.encode(text, bos=False)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_not_a_bpe_file_is_a_user_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("this is not base64 rank\n")
    with pytest.raises(UserError, match="not a tiktoken BPE"):
        load_tokenizer(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
