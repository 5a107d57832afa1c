"""Learn byte-level BPE merges from a text file and write them as a tiktoken BPE file (Meta's tokenizer.model format).

Command line: `python -m llama3_raw.train_tokenizer --input data/tinyshakespeare.txt --vocab-size 1024 --output tok.model`

The text is first cut with Llama 3's split pattern; merges never cross those cuts. Ranks 0..255 are
the single bytes (in byte order), merge i gets rank 256 + i, so `load_tokenizer` reads the file
unchanged and puts the 256 special tokens right after the last rank, as Meta's tokenizer does.

Speed comes from two things: pair frequencies are counted over the *unique* chunks, weighted by how
often each occurs (Shakespeare has ~1.1M characters but only ~25K distinct chunks), and after each
merge only the chunks that contain the merged pair are recounted.
"""

import base64
import heapq
from collections import Counter, defaultdict
from pathlib import Path

import regex  # installed with tiktoken (one of its dependencies); it knows \p{L} / \p{N}, re does not
from tqdm import tqdm

from ..errors import UserError
from ..files import check_output_file, read_text, write_text
from ..locks import writing_alone
from ..tokenizer import SPLIT_PATTERN

NUM_BYTE_TOKENS = 256


def split_chunk_counts(text: str) -> Counter:
    """How often each pre-tokenizer chunk occurs: the units that BPE merges inside of."""
    return Counter(regex.findall(SPLIT_PATTERN, text))


def learn_bpe(text: str, vocab_size: int, show_progress: bool = False) -> list[bytes]:
    """The BPE vocabulary in rank order: the 256 single bytes, then one token per merge.

    Each step merges the most frequent adjacent pair (ties: the pair whose token ids are smallest, so
    the result is deterministic). When a pair's concatenation already is a token (two different
    splits of the same bytes), occurrences are merged into that token and no new rank is spent, so
    every byte string has exactly one rank, as tiktoken requires.
    """
    if vocab_size < NUM_BYTE_TOKENS:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {NUM_BYTE_TOKENS} byte tokens")
    vocab: list[bytes] = [bytes([b]) for b in range(NUM_BYTE_TOKENS)]
    token_id: dict[bytes, int] = {t: i for i, t in enumerate(vocab)}

    chunk_counts = split_chunk_counts(text)
    words: list[list[int]] = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # token ids per unique chunk
    weights: list[int] = list(chunk_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)  # which chunks contain the pair
    for w, (word, weight) in enumerate(zip(words, weights)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += weight
            pair_words[pair].add(w)
    # Max-heap of (-count, a, b) with lazy deletion: an entry is live only if its count is current.
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    with tqdm(total=vocab_size - NUM_BYTE_TOKENS, desc="learning BPE merges", unit="merge",
              disable=not show_progress, leave=False) as bar:
        while len(vocab) < vocab_size and heap:
            neg_count, a, b = heapq.heappop(heap)
            if pair_counts.get((a, b), 0) != -neg_count or neg_count == 0:
                continue  # stale entry
            merged = vocab[a] + vocab[b]
            new_id = token_id.get(merged)
            if new_id is None:
                new_id = len(vocab)
                vocab.append(merged)
                token_id[merged] = new_id
                bar.update(1)
            touched = merge_everywhere(words, weights, pair_counts, pair_words, (a, b), new_id)
            for pair in touched:
                count = pair_counts[pair]
                if count > 0:
                    heapq.heappush(heap, (-count, *pair))
                else:
                    pair_counts.pop(pair, None)
                    pair_words.pop(pair, None)
    return vocab


def merge_everywhere(words: list[list[int]], weights: list[int], pair_counts: dict, pair_words: dict,
                     pair: tuple[int, int], new_id: int) -> set[tuple[int, int]]:
    """Merge `pair` into `new_id` in every chunk that holds it, updating the pair counts and the pair -> chunks
    index in place; returns the pairs whose counts changed."""
    touched: set[tuple[int, int]] = set()
    for w in list(pair_words[pair]):
        old, weight = words[w], weights[w]
        for old_pair in zip(old, old[1:]):
            pair_counts[old_pair] -= weight
            touched.add(old_pair)
        new = merge_pair(old, *pair, new_id)
        words[w] = new
        for new_pair in zip(new, new[1:]):
            pair_counts[new_pair] += weight
            touched.add(new_pair)
        old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
        for gone in old_pairs - new_pairs:
            pair_words[gone].discard(w)
        for came in new_pairs - old_pairs:
            pair_words[came].add(w)
    return touched


def merge_pair(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every non-overlapping (a, b), left to right, with new_id."""
    out = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def bpe_file_text(vocab: list[bytes]) -> str:
    """tiktoken's BPE format: one `base64(token) rank` per line, ranks in order."""
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(vocab))


def write_bpe_file(vocab: list[bytes], path: Path) -> None:
    """Written atomically (files.py): an interrupted run never leaves half a tokenizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, bpe_file_text(vocab))


def train_tokenizer_file(input_path: Path, vocab_size: int, output: Path, show_progress: bool = True) -> list[bytes]:
    if vocab_size < NUM_BYTE_TOKENS:
        raise UserError(f"--vocab-size {vocab_size} is below {NUM_BYTE_TOKENS}; byte-level BPE needs all "
                        f"{NUM_BYTE_TOKENS} single bytes, so pass 256 or more.")
    check_output_file(output, "--output")  # before the learning, not after it
    text = read_text(input_path, "--input")
    with writing_alone(output, "--output", folder=False):  # a second learner of the same file is refused at once
        vocab = learn_bpe(text, vocab_size, show_progress)
        write_bpe_file(vocab, output)
    return vocab
