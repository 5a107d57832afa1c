"""Talking to Llama 3 Instruct: Meta's chat format, and a session that keeps its KV cache across turns.

A dialog is encoded the way Meta's instruct models were trained (llama_models' ChatFormat):

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\\n\\n{system prompt}<|eot_id|>      (optional)
    <|start_header_id|>user<|end_header_id|>\\n\\n{message}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{reply}<|eot_id|>
    ...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                            (the model writes from here)

The session remembers which tokens already have their keys and values in the cache, so each turn
feeds only what is new (the end of the last reply, the new message, the assistant header). When the
dialog outgrows the context, the oldest turns are dropped and the shortened dialog is fed again.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import UserError
from .files import read_json
from .generate import Sampling, decode, new_generator
from .model import KVCache, Weights, new_kv_cache
from .parallel import SINGLE_PROCESS, Ranks
from .params import ModelParams
from .tokenizer import TextStream, Tokenizer

ROLES = ("system", "user", "assistant")


def encode_header(tokenizer: Tokenizer, role: str) -> list[int]:
    special = tokenizer.special_tokens
    return [special["<|start_header_id|>"], *tokenizer.encode(role, bos=False),
            special["<|end_header_id|>"], *tokenizer.encode("\n\n", bos=False)]


def encode_message(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    """One whole message, header to <|eot_id|>; special-token strings in `content` stay plain text."""
    return [*encode_header(tokenizer, role), *tokenizer.encode(content, bos=False), tokenizer.special_tokens["<|eot_id|>"]]


def encode_dialog(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """<|begin_of_text|>, every message, then the assistant header that asks the model for a reply."""
    ids = [tokenizer.bos_id]
    for message in messages:
        ids += encode_message(tokenizer, message["role"], message["content"])
    return ids + encode_header(tokenizer, "assistant")


def read_chat_file(path: Path) -> list[dict]:
    """A JSON list of {"role": "system"|"user"|"assistant", "content": "..."} messages."""
    fix = 'write a JSON list of {"role": "system"|"user"|"assistant", "content": "..."} objects'
    messages = read_json(path, fix, what="--chat-file")
    check_messages(messages, f"--chat-file {path}", fix)
    return messages


def check_messages(messages, source: str, fix: str) -> None:
    if not isinstance(messages, list):
        raise UserError(f"{source} does not hold a list of messages; {fix}.")
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or set(message) != {"role", "content"} or message["role"] not in ROLES
                or not isinstance(message["content"], str)):
            raise UserError(f"{source}: message {i} is not an object with a role ({', '.join(ROLES)}) and a text "
                            f"content; {fix}.")
        if message["role"] == "system" and i > 0:
            raise UserError(f"{source}: message {i} is a system message, which may only come first; {fix}.")


class ChatSession:
    """A conversation with one model: the messages so far, and the KV cache of the tokens already fed.

    Each message keeps its token ids next to its text: a reply is kept as the ids the model chose
    (decoding and re-encoding them need not give the same ids back). Invariant: the cache holds the
    keys and values of (at least) `self.fed`, always a prefix of the dialog's ids, so a turn feeds only
    `dialog_ids()[len(self.fed):]`. Iterate a reply to its end: the reply joins the dialog then.
    """

    def __init__(self, weights: Weights, params: ModelParams, tokenizer: Tokenizer, max_new_tokens: int,
                 sampling: Sampling = Sampling(), cache_dtype: torch.dtype | None = None, device="cpu",
                 notice: Callable[[str], None] = print, ranks: Ranks = SINGLE_PROCESS):
        self.weights, self.params, self.tokenizer = weights, params, tokenizer
        self.max_new_tokens, self.sampling, self.device = max_new_tokens, sampling, device
        self.cache_dtype = cache_dtype or weights["tok_embeddings.weight"].dtype
        self.notice = notice
        self.ranks = ranks  # tensor parallel: this rank's place (parallel.py)
        self.messages: list[dict] = []  # {"role", "content", "ids": the whole message's token ids}
        self.fed: list[int] = []
        self.cache: KVCache | None = None
        self.generator = new_generator(sampling)  # one for the whole conversation: a seed repeats all of it

    def add(self, role: str, content: str, ids: list[int] | None = None) -> None:
        if ids is None:
            ids = encode_message(self.tokenizer, role, content)
        self.messages.append({"role": role, "content": content, "ids": ids})

    def dialog(self) -> list[dict]:
        """The messages as {"role", "content"}, oldest first."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def dialog_ids(self) -> list[int]:
        """Token ids of the whole dialog, ending with the assistant header that asks for the next reply."""
        ids = [self.tokenizer.bos_id]
        for message in self.messages:
            ids += message["ids"]
        return ids + encode_header(self.tokenizer, "assistant")

    def reply(self, text: str) -> Iterator[int]:
        """Add a user message and stream the assistant's reply (token ids, stop token not included)."""
        self.add("user", text)
        return self.respond()

    def respond(self) -> Iterator[int]:
        """Stream the assistant's reply to the dialog as it stands; the reply joins the dialog at the end."""
        prompt = self.fit_to_context(self.dialog_ids())
        n_new = min(self.max_new_tokens, self.params.context_len - len(prompt))  # >= 1: fit_to_context saw to it
        if self.fed != prompt[:len(self.fed)]:  # earlier turns were dropped: the cache no longer matches
            self.fed = []
        self.reserve(len(prompt) + n_new)
        new = torch.tensor([prompt[len(self.fed):]], dtype=torch.long, device=self.device)  # (1, S): what the cache lacks
        reply: list[int] = []
        steps = decode(self.weights, self.params, new, self.cache_at(len(self.fed)), n_new, self.tokenizer.stop_ids,
                       self.sampling, self.generator, ranks=self.ranks)
        for _rows, (token,) in steps:
            reply.append(token)
            yield token
        self.fed = prompt + reply[:-1]  # decode feeds each token it yields before the next; the last maybe not yet
        eot = self.tokenizer.special_tokens["<|eot_id|>"]
        self.add("assistant", self.tokenizer.decode(reply), [*encode_header(self.tokenizer, "assistant"), *reply, eot])

    def cache_at(self, length: int) -> KVCache:
        return KVCache(self.cache.keys, self.cache.values, length)

    def reserve(self, capacity: int) -> None:
        """Make the cache hold `capacity` positions, keeping what is filled: it grows as the talk goes on
        (doubling, up to the context), instead of taking the whole context's memory up front."""
        if self.cache is not None and self.cache.capacity >= capacity:
            return
        old = self.cache
        if old is not None:
            capacity = min(max(capacity, 2 * old.capacity), self.params.context_len)
        self.cache = new_kv_cache(self.params, 1, capacity, self.cache_dtype, self.device, self.ranks)
        if old is not None and self.fed:
            filled = len(self.fed)
            for new_k, new_v, old_k, old_v in zip(self.cache.keys, self.cache.values, old.keys, old.values):
                new_k[:, :filled] = old_k[:, :filled]
                new_v[:, :filled] = old_v[:, :filled]

    def fit_to_context(self, prompt: list[int]) -> list[int]:
        """Drop the oldest turns (never the system prompt or the newest message) until the prompt leaves
        room for a full reply; refuse a newest message that does not fit the context at all."""
        context = self.params.context_len
        dropped = 0
        while len(prompt) + self.max_new_tokens > context:
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                break
            del self.messages[first]
            dropped += 1
            while len(self.messages) - first > 1 and self.messages[first]["role"] == "assistant":
                del self.messages[first]  # the history starts with a user turn
                dropped += 1
            prompt = self.dialog_ids()
        if dropped:
            self.notice(f"note: the conversation outgrew the {context}-token context; dropped the oldest "
                        f"{dropped} message(s) and read the rest again.")
        if len(prompt) >= context:
            self.messages.pop()
            raise UserError(f"the message makes a {len(prompt)}-token prompt but the context holds {context}; "
                            f"send a shorter message or raise --context-len.")
        return prompt


def stream_reply(session: ChatSession, replies: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Write a reply's text as its tokens come (never splitting a UTF-8 character); return its ids."""
    stream = TextStream(session.tokenizer)
    ids = []
    for token in replies:
        ids.append(token)
        write(stream.push(token))
    write(stream.flush())
    return ids


def interactive_chat(session: ChatSession, lines: Iterator[str], write: Callable[[str], None],
                     ask: Callable[[str], None]) -> None:
    """One message per input line; each reply streams to `write`. `/reset` forgets the conversation
    (except the system prompt), `/exit` or the end of input ends it. A message that cannot be answered
    (too long for the context) is reported and the session goes on."""
    ask("> ")
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            session.messages = [m for m in session.messages if m["role"] == "system"]
            session.notice("note: conversation reset.")
        elif text.strip():
            try:
                stream_reply(session, session.reply(text), write)
                write("\n")
            except UserError as err:
                session.notice(f"error: {err}")
        ask("> ")
