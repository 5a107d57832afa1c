"""How much int8 or int4 weights change the model, against the same weights in bf16.

    python -m bench.quantized_accuracy --ckpt-dir weights/shakespeare --text data/tinyshakespeare.txt
    python -m bench.quantized_accuracy --ckpt-dir weights/shakespeare --text data/tinyshakespeare.txt --scheme int4 --group-size 64
    python -m bench.quantized_accuracy --ckpt-dir bench/out/ckpt-1b
    python -m bench.quantized_accuracy --ckpt-dir weights/shakespeare --text data/tinyshakespeare.txt --scheme q4_0
    python -m bench.quantized_accuracy --ckpt-dir weights/shakespeare --text data/tinyshakespeare.txt --scheme q4_k_m

--scheme q4_0 is not one of ours: the same matrices rounded as llama.cpp's Q4_0 rounds them (blocks of 32, one
scale each, no offset: 4.5 bits a weight, as our int4 in groups of 64), multiplied back in bf16 -- its accuracy as
a reference point. (llama-quantize's Q4_0 files keep the output matrix in Q6_K; here it is Q4_0 too.) --scheme
q4_k_m is llama-quantize's own Q4_K_M, its output matrix and the mix of types included (bench/ggml_rounding.py;
needs `python -m bench.llamacpp setup`), multiplied back in bf16 the same way.

Greedy-decodes --steps tokens with the bf16 weights, then feeds that same sequence to both models
(teacher forcing, so one early difference does not derail the rest) and reports the top-1 agreement
and the largest logit difference over those positions. With --text, also the validation nats/char of
both (the last 10 % of the file by characters, as the training split holds it out).
"""

import argparse
import json
import time

import torch

from llama3_raw.generate import generate
from llama3_raw.checkpoints import cast_weights, load_checkpoint
from llama3_raw.model import forward
from llama3_raw.quantize import is_quantized_key, quantize_weights
from llama3_raw.tools.score import score_text
from llama3_raw.tokenizer import load_tokenizer
from llama3_raw.checkpoints import default_tokenizer_path

VALIDATION_FRACTION = 0.1
Q4_0_BLOCK = 32


def q4_0_rounded(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) as llama.cpp's Q4_0 stores it, back in bf16: per block of 32 inputs the value of largest
    magnitude m sets the scale d = m / -8 (kept as float16), q = min(15, trunc(x / d + 8.5)), w' = (q - 8) d
    (ggml's quantize_row_q4_0_ref and dequantize_row_q4_0)."""
    blocks = w.float().reshape(-1, Q4_0_BLOCK)  # (out * in / 32, 32)
    largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed
    d = largest / -8
    scale = d.half().float()  # stored as float16; the rounding divides by d itself, as ggml's does
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(blocks * inverse + 8.5), max=15)
    return ((q - 8) * scale).reshape(w.shape).to(w.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--text", help="text file whose last 10%% is scored (nats/char)")
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--window", type=int, default=256, help="scoring window in tokens")
    parser.add_argument("--scheme", choices=["int8", "int4", "q4_0", "q4_k_m"], default="int8")
    parser.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale and zero")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.ckpt_dir, show_progress=False)
    params = checkpoint.params
    bf16 = cast_weights(checkpoint.weights, torch.bfloat16, "cpu")
    start = time.perf_counter()
    ggml_types = None
    if args.scheme == "q4_0":
        quantized = {key: q4_0_rounded(w) if is_quantized_key(key) else w for key, w in bf16.items()}
    elif args.scheme == "q4_k_m":
        from bench.ggml_rounding import rounded_by_llama_quantize
        quantized, ggml_types = rounded_by_llama_quantize(bf16, params, "Q4_K_M")
    else:
        quantized = quantize_weights(bf16, torch.bfloat16, args.scheme, args.group_size)
    quantize_s = time.perf_counter() - start
    tokenizer = load_tokenizer(str(default_tokenizer_path(checkpoint.directory)))

    prompt = tokenizer.encode(args.prompt, bos=True)
    greedy = list(generate(bf16, params, prompt, args.steps, stop_ids=()))
    sequence = torch.tensor([prompt + greedy])  # (1, L)
    with torch.inference_mode():
        bf16_logits, _ = forward(bf16, params, sequence)  # (1, L, V)
        quantized_logits, _ = forward(quantized, params, sequence)
    predicted = slice(len(prompt) - 1, sequence.shape[1] - 1)  # the positions that chose the greedy tokens
    agreement = (bf16_logits[0, predicted].argmax(-1) == quantized_logits[0, predicted].argmax(-1)).float().mean().item()
    diff = (bf16_logits[0, predicted] - quantized_logits[0, predicted]).abs()
    result = {
        "checkpoint": str(args.ckpt_dir), "scheme": args.scheme, "group_size": args.group_size if args.scheme == "int4" else None,
        "positions": len(greedy), "top1_agreement": agreement,
        "max_logit_diff": diff.max().item(), "max_abs_logit_bf16": bf16_logits[0, predicted].abs().max().item(),
        "mean_logit_diff": diff.mean().item(), "quantize_s": quantize_s, "ggml_types": ggml_types,
    }
    if args.text:
        text = open(args.text, encoding="utf-8").read()
        validation = text[int(len(text) * (1 - VALIDATION_FRACTION)):]
        window = min(args.window, params.context_len)
        for name, weights in (("bf16", bf16), (args.scheme, quantized)):
            with torch.inference_mode():
                score = score_text(weights, params, tokenizer, validation, window, window // 2)
            result[f"nats_per_char_{name}"] = score.nats_per_char
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
