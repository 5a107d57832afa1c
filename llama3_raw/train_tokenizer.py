"""Learn a tokenizer: `python -m llama3_raw.train_tokenizer --input FILE --vocab-size N --output FILE`, byte-level
BPE; or `--kind char` for the input's characters, one token each (no --vocab-size: the text decides it).

A thin command line over training/bpe.py and training/chars.py, which hold the algorithms. Both write Meta's
tokenizer.model format, with the 256 special tokens after the last rank.
"""

import sys
from pathlib import Path

from .checkpoints.defaults import positive_int
from .errors import ArgumentParser, UserError
from .events import run_tool
from .training.bpe import train_tokenizer_file
from .training.chars import train_char_tokenizer_file


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m llama3_raw.train_tokenizer",
                            description="Learn byte-level BPE merges (or take the characters) and write a tiktoken "
                                        "tokenizer.model.")
    parser.add_argument("--input", type=Path, required=True, help="UTF-8 text file to learn from")
    parser.add_argument("--kind", choices=("bpe", "char"), default="bpe",
                        help="bpe: byte-level BPE (default); char: one token per character of the input")
    parser.add_argument("--vocab-size", type=positive_int,
                        help="--kind bpe: number of BPE ranks, >= 256 (256 = pure bytes); the 256 special tokens "
                             "come on top")
    parser.add_argument("--output", type=Path, required=True, help="where to write the tokenizer.model file")
    args = parser.parse_args(argv)

    def work():
        if args.kind == "char":
            if args.vocab_size is not None:
                raise UserError("--vocab-size is for --kind bpe; a character-level tokenizer has one token per "
                                "character of --input, so drop --vocab-size.")
            vocab = train_char_tokenizer_file(args.input, args.output)
            print(f"wrote {args.output}: {len(vocab)} characters (+256 special tokens)", file=sys.stderr)
            return
        if args.vocab_size is None:
            raise UserError("--vocab-size is required for --kind bpe; add it (e.g. --vocab-size 1024), or pass "
                            "--kind char.")
        vocab = train_tokenizer_file(args.input, args.vocab_size, args.output)
        print(f"wrote {args.output}: {len(vocab)} BPE ranks (+256 special tokens)", file=sys.stderr)

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
