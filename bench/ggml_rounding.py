"""A checkpoint's weights rounded exactly as llama.cpp's `llama-quantize` rounds them (Q4_K_M, Q4_0, ...), read back.

bench/quantized_accuracy.py uses this for `--scheme q4_k_m`: the accuracy of the recipe most users download, on
any checkpoint of ours (the shipped model's own tokenizer is not one llama.cpp's converter knows, so its GGUF is
written here directly with gguf-py: the architecture's sizes and the tensors, no vocabulary, which llama-quantize
does not read). llama-quantize chooses each tensor's type by its name and layer as it does for any Llama (for
Q4_K_M: Q6_K for the output matrix and for attn_v and ffn_down in half the layers, Q4_K elsewhere, and its
fallbacks where a row's length is not a multiple of 256); gguf-py's dequantize brings every tensor back. Rows are
quantized one by one, so Meta's q/k row order needs no Hugging Face permutation here.
"""

import subprocess
import tempfile
from pathlib import Path

import torch

from bench import llamacpp

# Meta's names -> llama.cpp's, per layer and for the whole model
LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
               "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
               "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
MODEL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output.weight": "output.weight"}


def gguf_name(key: str) -> str:
    if key in MODEL_NAMES:
        return MODEL_NAMES[key]
    _, layer, rest = key.split(".", 2)  # layers.{i}.{part}.weight
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_float_gguf(weights: dict[str, torch.Tensor], params, path: Path) -> None:
    gguf = llamacpp.gguf_module()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(params.context_len)
    writer.add_embedding_length(params.dim)
    writer.add_block_count(params.n_layers)
    writer.add_feed_forward_length(params.ffn_hidden_dim)
    writer.add_head_count(params.n_heads)
    writer.add_head_count_kv(params.n_kv_heads)
    writer.add_rope_dimension_count(params.head_dim)
    writer.add_layer_norm_rms_eps(params.norm_eps)
    writer.add_rope_freq_base(params.rope_theta)
    writer.add_vocab_size(params.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, tensor in weights.items():
        writer.add_tensor(gguf_name(key), tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rounded_by_llama_quantize(weights: dict[str, torch.Tensor], params, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(every weight as `llama-quantize ... KIND` leaves it, back in the weights' dtype; GGML type -> tensor count)."""
    llamacpp.require_build()
    gguf = llamacpp.gguf_module()
    with tempfile.TemporaryDirectory() as folder:
        source, quantized = Path(folder) / "f32.gguf", Path(folder) / f"{kind.lower()}.gguf"
        write_float_gguf(weights, params, source)
        result = subprocess.run([str(llamacpp.BIN / "llama-quantize"), str(source), str(quantized), kind],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{result.stdout[-2000:]}{result.stderr[-2000:]}\nerror: llama-quantize {kind} failed.")
        tensors = {t.name: t for t in gguf.GGUFReader(quantized).tensors}
        rounded, types = {}, {}
        for key, tensor in weights.items():
            found = tensors[gguf_name(key)]
            values = gguf.quants.dequantize(found.data, found.tensor_type).copy()
            rounded[key] = torch.from_numpy(values).reshape(tensor.shape).to(tensor.dtype)
            types[found.tensor_type.name] = types.get(found.tensor_type.name, 0) + 1
    return rounded, types
