"""Chat: Meta's dialog format against llama_models' ChatFormat, and the cached session against one-shot prefills.

Oracles: `ChatFormat.encode_dialog_prompt` (llama_models/llama3/chat_format.py, with Meta's own Tokenizer)
for the token ids of a dialog; our `generate` on the whole dialog at once (itself checked against Meta's
reference in test_reference.py) for what a session that reuses its KV cache must produce, greedy, fp32.
"""

import importlib
from dataclasses import replace

import pytest
from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

import llama3_raw.chat as chat
from helpers import OFFICIAL_TOKENIZER, fp32_model, spy_on_forward
from llama3_raw import generate, load_tokenizer
from llama3_raw.chat import ChatSession, encode_dialog

generation = importlib.import_module("llama3_raw.generate")  # the module (the package exports a function of that name)

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Japan? 日本 🗾\n\nThanks"}],
    [{"role": "user", "content": "Is <|eot_id|> a special token here?  \t spaces"},
     {"role": "assistant", "content": ""},
     {"role": "user", "content": "def f(x):\n    return x ** 2"}],
]


@pytest.mark.parametrize("dialog", DIALOGS)
def test_dialog_ids_equal_metas_chat_format(dialog):
    meta_format = ChatFormat(MetaTokenizer(OFFICIAL_TOKENIZER))
    meta_messages = [RawMessage(role=m["role"], content=m["content"],
                                stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None)
                     for m in dialog]
    expected = meta_format.encode_dialog_prompt(meta_messages).tokens
    assert encode_dialog(load_tokenizer(OFFICIAL_TOKENIZER), dialog) == expected


@pytest.fixture(scope="module")
def model(gqa_checkpoint):
    ckpt_dir, _, _ = gqa_checkpoint
    return fp32_model(ckpt_dir)


def test_second_turn_feeds_only_new_tokens_and_equals_one_shot_prefill(model, monkeypatch):
    weights, params, tokenizer = model
    session = ChatSession(weights, params, tokenizer, max_new_tokens=6, notice=lambda _: None)
    session.add("system", "Be brief.")
    first = list(session.reply("Hello there"))
    fed_after_first = len(session.fed)
    session.add("user", "Tell me more")
    prompt = session.dialog_ids()  # the whole dialog so far, as one prompt
    shapes = spy_on_forward(monkeypatch, generation)
    second = list(session.respond())
    calls = [shape[1] for shape in shapes]  # tokens fed per forward call

    assert calls[0] == len(prompt) - fed_after_first < len(prompt) // 2  # no re-prefill of the history
    assert prompt[:fed_after_first] == session.fed[:fed_after_first]
    alone = list(generate(weights, params, prompt, 6, tokenizer.stop_ids))  # one-shot prefill of the dialog
    assert second == alone and len(second) > 0
    assert len(first) > 0


def test_history_is_trimmed_with_a_notice_when_the_context_fills(model):
    weights, params, tokenizer = model
    small = replace(params, max_seq_len=90)
    notices = []
    session = ChatSession(weights, small, tokenizer, max_new_tokens=10, notice=notices.append)
    session.add("system", "Be brief.")
    for text in ["first question here", "second question here", "third question here", "fourth one"]:
        list(session.reply(text))
    assert any("dropped the oldest" in n for n in notices)
    assert session.messages[0]["role"] == "system" and session.messages[1]["role"] == "user"
    assert "first question here" not in [m["content"] for m in session.messages]
    assert len(session.fed) <= 90
    # After trimming, the last reply is what a fresh prefill of the trimmed dialog gives.
    last_reply = session.messages.pop()
    session.messages.pop()
    session.add("user", "fourth one")
    expected = list(generate(weights, small, session.dialog_ids(), 10, tokenizer.stop_ids))
    assert last_reply["ids"][len(chat.encode_header(tokenizer, "assistant")):-1] == expected


def test_message_longer_than_the_context_is_refused_and_the_session_goes_on(model):
    from llama3_raw import UserError

    weights, params, tokenizer = model
    session = ChatSession(weights, replace(params, max_seq_len=40), tokenizer, max_new_tokens=4, notice=lambda _: None)
    with pytest.raises(UserError, match="context holds 40"):
        list(session.reply("word " * 60))
    assert session.messages == []
    assert len(list(session.reply("short"))) <= 4
