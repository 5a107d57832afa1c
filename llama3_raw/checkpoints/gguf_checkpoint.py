"""A GGUF file (llama.cpp, Ollama, LM Studio) read into Meta's names: params from its metadata, weights from
its tensors, the tokenizer from its vocabulary (llama3_raw/gguf_vocab.py). `--ckpt-dir` names the .gguf
file, or a folder that holds exactly one (and no params.json / config.json).

GGUF names (llama.cpp's convert_hf_to_gguf.py)      Meta's names
    token_embd.weight                               tok_embeddings.weight
    blk.{i}.attn_norm / attn_q / attn_k / attn_v    layers.{i}.attention_norm / attention.wq / wk / wv
    blk.{i}.attn_output                             layers.{i}.attention.wo
    blk.{i}.ffn_norm / ffn_gate / ffn_down / ffn_up layers.{i}.ffn_norm / feed_forward.w1 / w2 / w3
    output_norm.weight, output.weight               norm.weight, output.weight (absent: tied to the embeddings)
    rope_freqs.weight                               Llama 3.1's RoPE scaling, as per-frequency divisors

llama.cpp's converter permutes a Hugging Face model's wq and wk rows back to Meta's interleaved order, so
the rows are used as they are (tests/test_gguf.py checks it: SmolLM2's logits against transformers', which
undoes that permutation when it reads a GGUF). F32, F16 and BF16 tensors are views of the file's pages;
block-quantized ones stay in the file until the loader dequantizes them, one at a time (gguf_quants.py).
"""

import re
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import UserError
from ..model import rope_frequencies  # the model's own RoPE scaling, so that what runs is what is checked
from ..params import ModelParams, ffn_fields
from .gguf_file import GGUFFile, TensorInfo, is_gguf_file, read_gguf, type_name
from .safety import check_params_fit_files, folder_file_size
from .gguf_quants import PLAIN_TYPES, check_type, file_tensor

ARCHITECTURE = "llama"
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
LAYER_NAMES = {"attn_norm.weight": "attention_norm.weight", "attn_q.weight": "attention.wq.weight",
               "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
               "attn_output.weight": "attention.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
               "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
               "ffn_up.weight": "feed_forward.w3.weight"}
LAYER_KEY = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"
LLAMA_ROPE_THETA = 10000.0  # llama.cpp's default when llama.rope.freq_base is absent
FIX = "pass a Llama-architecture GGUF (Llama 3, 3.1, 3.2, SmolLM2, ...)"


def meta_name(gguf_name: str) -> str | None:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    match = LAYER_KEY.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def setting(file: GGUFFile, key: str, kind: type, default=None):
    """Metadata value `key` of type `kind` (an int is a float too), or `default` when absent."""
    value = file.metadata.get(key, default)
    if value is None:
        raise UserError(f"{file.path} lacks the metadata {key}, which a Llama model's GGUF carries; {FIX}.")
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        raise UserError(f"{file.path}: metadata {key} is {value!r}, not a {kind.__name__}; {FIX}.")
    return value


def check_architecture(file: GGUFFile) -> None:
    arch = file.metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise UserError(f"{file.path} holds a {arch!r} model, not the Llama architecture this project runs; {FIX}.")
    if file.metadata.get("llama.expert_count", 0):
        raise UserError(f"{file.path} is a mixture-of-experts model (llama.expert_count "
                        f"{file.metadata['llama.expert_count']}), which Llama 3 is not; {FIX}.")


def params_from_gguf(file: GGUFFile) -> ModelParams:
    """ModelParams from the file's llama.* metadata; anything that is not Llama 3's architecture is refused."""
    check_architecture(file)
    dim = setting(file, "llama.embedding_length", int)
    n_heads = setting(file, "llama.attention.head_count", int)
    hidden = setting(file, "llama.feed_forward_length", int)
    vocab = file.metadata.get("llama.vocab_size")
    if vocab is None:  # older files: the vocabulary's length, else the embedding matrix's rows
        tokens = file.metadata.get("tokenizer.ggml.tokens")
        embedding = file.tensors.get("token_embd.weight")
        vocab = len(tokens) if isinstance(tokens, list) else embedding.shape[0] if embedding else None
    try:
        params = ModelParams(
            dim=dim, n_layers=setting(file, "llama.block_count", int), n_heads=n_heads,
            n_kv_heads=setting(file, "llama.attention.head_count_kv", int, n_heads),
            vocab_size=vocab, **ffn_fields(dim, hidden),
            norm_eps=float(setting(file, "llama.attention.layer_norm_rms_epsilon", float)),
            rope_theta=float(setting(file, "llama.rope.freq_base", float, LLAMA_ROPE_THETA)),
            max_seq_len=setting(file, "llama.context_length", int, 0))
    except (ValueError, TypeError) as err:
        raise UserError(f"{file.path} does not describe a usable Llama model ({err}); {FIX}.") from None
    check_params_fit_files(params, file.size, file.path)  # n_layers 2**31: refused by arithmetic, not a shape table
    if params.ffn_hidden_dim != hidden:
        raise UserError(f"{file.path}: llama.feed_forward_length {hidden} cannot be expressed as Meta's SwiGLU "
                        f"width; {FIX}.")
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if file.metadata.get(key, params.head_dim) != params.head_dim:
            raise UserError(f"{file.path}: {key} is {file.metadata[key]}, but Llama rotates and attends over the "
                            f"whole head of {params.head_dim}; {FIX}.")
    return with_rope_scaling(file, params)


def with_rope_scaling(file: GGUFFile, params: ModelParams) -> ModelParams:
    """Llama 3.1+'s RoPE scaling, from rope_freqs.weight (llama.cpp stores the divisor of each frequency rather
    than the constants): Meta's constants with the largest divisor as the factor, verified to give those
    divisors."""
    info = file.tensors.get(ROPE_FREQS)
    scaling_type = file.metadata.get("llama.rope.scaling.type", "none")
    if scaling_type not in ("none", "llama3"):
        raise UserError(f"{file.path} scales RoPE as {scaling_type!r}, not as Llama 3.1 does; {FIX}.")
    if info is None:
        return params
    if info.shape != (params.head_dim // 2,) or info.ggml_type != 0:
        raise UserError(f"{file.path}: {ROPE_FREQS} has shape {info.shape}, not ({params.head_dim // 2},) float32; {FIX}.")
    divisors = file_tensor(file.mapping, info).clone()
    original = setting(file, "llama.rope.scaling.original_context_length", int, 8192)
    try:
        scaled = replace(params, use_scaled_rope=True, rope_scaling_factor=float(divisors.max()),
                         rope_original_context=original)
    except ValueError as err:
        raise UserError(f"{file.path}: {ROPE_FREQS} is not Llama 3.1's RoPE scaling ({err}); {FIX}.") from None
    ours = rope_frequencies(replace(scaled, use_scaled_rope=False)) / rope_frequencies(scaled)
    if not torch.allclose(ours, divisors, rtol=1e-4, atol=0):
        raise UserError(f"{file.path}: {ROPE_FREQS} is not Llama 3.1's RoPE scaling with Meta's constants "
                        f"(low 1, high 4, factor {scaled.rope_scaling_factor:g}); {FIX}.")
    return scaled


def open_gguf(path: Path) -> tuple[GGUFFile, ModelParams]:
    file = read_gguf(path)
    return file, params_from_gguf(file)


def gguf_weights(file: GGUFFile, params: ModelParams) -> tuple[dict, bool]:
    """(weights by Meta's names, tied output), every name, type and shape checked against `params`."""
    expected = params.weight_shapes()
    tied = "output.weight" not in file.tensors
    if tied:
        del expected["output.weight"]
    weights = {}
    for name, info in file.tensors.items():
        if name == ROPE_FREQS:
            continue
        key = meta_name(name)
        if key is None or key not in expected:
            raise UserError(f"{file.path} holds the tensor {name}, which is not part of a Llama model of "
                            f"{params.n_layers} layers; {FIX}.")
        check_tensor(file.path, info, expected[key])
        weights[key] = file_tensor(file.mapping, info)
    missing = [name for name, key in gguf_names(params, tied).items() if key not in weights]
    if missing:
        raise UserError(f"{file.path} lacks the tensor {missing[0]} ({len(missing)} missing), which its metadata "
                        f"implies; the file is incomplete, {FIX}.")
    return weights, tied


def check_tensor(path: Path, info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape:
        raise UserError(f"{path}: tensor {info.name} has shape {info.shape} but the file's metadata implies {shape}; "
                        f"the file is corrupt, {FIX}.")
    problem = check_type(info)
    if problem is None and len(shape) == 1 and info.ggml_type not in PLAIN_TYPES:
        problem = f"tensor {info.name}, a norm's weights, is block-quantized ({type_name(info.ggml_type)}), not F32, F16 or BF16"
    if problem:
        raise UserError(f"{path}: {problem}; convert the model again with one of those types.")


def gguf_names(params: ModelParams, tied: bool) -> dict[str, str]:
    """GGUF name -> Meta name of every tensor `params` implies."""
    inverse = {meta: top for top, meta in TOP_NAMES.items()}
    names = {}
    for key in params.weight_shapes():
        if key == "output.weight" and tied:
            continue
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if match:
            layer_name = next(g for g, m in LAYER_NAMES.items() if m == match.group(2))
            names[f"blk.{match.group(1)}.{layer_name}"] = key
        else:
            names[inverse[key]] = key
    return names


def gguf_path(ckpt_dir: Path) -> Path | None:
    """The GGUF file `ckpt_dir` stands for: itself, or the one .gguf in a folder without Meta's or Hugging
    Face's files; None for anything else (a folder of two .gguf files is refused, naming them)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        return ckpt_dir if is_gguf_file(ckpt_dir) else None
    if not ckpt_dir.is_dir() or (ckpt_dir / "params.json").exists() or (ckpt_dir / "config.json").exists():
        return None
    found = sorted(p for p in ckpt_dir.glob("*.gguf"))
    if len(found) > 1:
        raise UserError(f"{ckpt_dir} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}); "
                        f"pass the one to run as --ckpt-dir {found[0]}.")
    if found:
        folder_file_size(ckpt_dir, found[0])  # a symlink out of the folder, a FIFO: refused before it is opened
    return found[0] if found else None


def read_gguf_checkpoint(path: Path) -> tuple[ModelParams, dict, int, bool]:
    """(params, weights by Meta's names, bytes on disk, tied output) of a GGUF file: float tensors are views
    of the mapped file, block-quantized ones BlockTensors that dequantize when cast (loading.cast_weights)."""
    file, params = open_gguf(path)
    weights, tied = gguf_weights(file, params)
    return params, weights, file.size, tied
