"""Learn a byte-level BPE tokenizer: `python -m llama3_raw.train_tokenizer --input FILE --vocab-size N --output FILE`.

A thin command line over training/bpe.py, which holds the algorithm.
"""

import sys
from pathlib import Path

from .checkpoints.defaults import positive_int
from .errors import ArgumentParser
from .events import run_tool
from .training.bpe import train_tokenizer_file


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m llama3_raw.train_tokenizer",
                                     description="Learn byte-level BPE merges and write a tiktoken tokenizer.model.")
    parser.add_argument("--input", type=Path, required=True, help="UTF-8 text file to learn from")
    parser.add_argument("--vocab-size", type=positive_int, required=True,
                        help="number of BPE ranks, >= 256 (256 = pure bytes); the 256 special tokens come on top")
    parser.add_argument("--output", type=Path, required=True, help="where to write the tokenizer.model file")
    args = parser.parse_args(argv)

    def work():
        vocab = train_tokenizer_file(args.input, args.vocab_size, args.output)
        print(f"wrote {args.output}: {len(vocab)} BPE ranks (+256 special tokens)", file=sys.stderr)

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
