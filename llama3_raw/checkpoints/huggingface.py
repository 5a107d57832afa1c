"""Hugging Face's Llama layout (config.json + model*.safetensors) read into Meta's names and conventions.

Hugging Face's conversion script (transformers' convert_llama_weights_to_hf.py) renames every tensor and
reorders the rows of wq and wk: Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... while
Hugging Face's rotates the two halves of each head (x0, x_{d/2}), (x1, x_{d/2+1}), ... and the conversion
permutes the rows so that both give the same attention. We undo that permutation, so one forward pass
(Meta's) serves both formats. The safetensors files are memory-mapped; only wq and wk are copied.
"""

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..files import read_json
from ..params import ModelParams, ffn_fields
from .safety import check_params_fit_files, folder_file_size

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Hugging Face name -> Meta name; {i} is the layer number.
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a buffer older transformers versions saved; recomputed from the config


def is_hf_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors*"))


def safetensors_candidates(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("model*.safetensors"))


def hf_meta_name(hf_name: str) -> str | None:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    match = LAYER_KEY.fullmatch(hf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's `permute` of wq/wk rows: per head, rows (0..d/2-1, d/2..d-1) back to interleaved.

    Hugging Face row h*d + half*d/2 + j holds Meta's row h*d + 2j + half.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, d/2, 2, D) -> (H*d, D)


def read_config(path: Path) -> dict:
    """config.json, or the safetensors index: a JSON object."""
    return read_json(path, f"restore the {path.name} that came with the checkpoint", expect=dict)


def params_from_hf_config(config: dict, path: Path) -> ModelParams:
    """ModelParams from a Hugging Face LlamaConfig; anything that is not Llama 3's architecture is refused."""
    def refuse(why: str):
        raise UserError(f"{path} is not a Llama 3 config.json ({why}); point --ckpt-dir at a Llama 3 download.")

    if config.get("model_type") != "llama":
        refuse(f"model_type is {config.get('model_type')!r}, not 'llama'")
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        refuse(f"architectures {architectures} do not include LlamaForCausalLM")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size", "rms_norm_eps")
    missing = [name for name in required if name not in config]
    if missing:
        refuse(f"missing {', '.join(missing)}")
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        refuse("Llama 3 uses SwiGLU with silu and no biases")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        refuse(f"head_dim {config['head_dim']} is not hidden_size / num_attention_heads")

    # Rope settings: older files have rope_theta + rope_scaling, transformers 5 writes rope_parameters.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        refuse(f"rope type {rope_type!r} is not Llama 3's ('llama3' or none)")
    scaling = {}
    if rope_type == "llama3":
        scaling = {"use_scaled_rope": True,
                   "rope_scaling_factor": rope.get("factor"), "rope_low_freq_factor": rope.get("low_freq_factor"),
                   "rope_high_freq_factor": rope.get("high_freq_factor"),
                   "rope_original_context": rope.get("original_max_position_embeddings")}
        scaling = {k: v for k, v in scaling.items() if v is not None}

    # Meta derives the SwiGLU width from dim, ffn_dim_multiplier and multiple_of; Hugging Face stores it.
    hidden = config["intermediate_size"]
    try:
        params = ModelParams(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
            **ffn_fields(dim, hidden), norm_eps=config["rms_norm_eps"],
            rope_theta=rope_theta, max_seq_len=config.get("max_position_embeddings") or 0, **scaling)
    except (ValueError, TypeError) as err:
        refuse(str(err))
    if params.ffn_hidden_dim != hidden:
        refuse(f"intermediate_size {hidden} cannot be expressed as Meta's SwiGLU width")
    return params


def safetensors_files(ckpt_dir: Path) -> dict[Path, list[str] | None]:
    """The files to read, each with the tensor names the index assigns it (None: all of the file's)."""
    index_path = ckpt_dir / INDEX_FILE
    if index_path.is_file():
        index = read_config(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map; restore the index file that came with the checkpoint.")
        files: dict[Path, list[str]] = {}
        for name, filename in weight_map.items():
            files.setdefault(ckpt_dir / str(filename), []).append(name)
        for path in files:  # an index is data: its entries may name ../elsewhere, /etc/passwd, a FIFO
            if not path.exists():
                raise UserError(f"{index_path} lists {path.name}, which is not in {ckpt_dir}; "
                                f"download that file too, or the index that belongs to these files.")
            folder_file_size(ckpt_dir, path, f"{INDEX_FILE} entry")
        return files
    if (ckpt_dir / SINGLE_FILE).is_file():
        return {ckpt_dir / SINGLE_FILE: None}
    found = safetensors_candidates(ckpt_dir)
    if not found:
        raise UserError(f"{ckpt_dir} has a config.json but no model*.safetensors; download the weights files too.")
    return {path: None for path in found}


def read_hf_checkpoint(ckpt_dir: Path) -> tuple[ModelParams, dict[str, torch.Tensor], int, bool]:
    """(params, weights with Meta's names, bytes on disk, tied output) from a Hugging Face directory.

    The caller verifies the keys and shapes against params (loading.check_weights).
    """
    config_path = ckpt_dir / "config.json"
    config = read_config(config_path)
    params = params_from_hf_config(config, config_path)
    files = safetensors_files(ckpt_dir)
    file_bytes = sum(path.stat().st_size for path in files)
    check_params_fit_files(params, file_bytes, config_path)
    weights: dict[str, torch.Tensor] = {}
    for path, names in files.items():
        try:
            with safe_open(str(path), framework="pt") as f:  # memory-mapped: tensors are views of the file
                for hf_name in names if names is not None else f.keys():
                    if hf_name.endswith(IGNORED_SUFFIX):
                        continue
                    meta_name = hf_meta_name(hf_name)
                    if meta_name is None:
                        raise UserError(f"{path} holds {hf_name}, which is not part of a Llama 3 model; "
                                        f"point --ckpt-dir at a Llama 3 (LlamaForCausalLM) download.")
                    weights[meta_name] = f.get_tensor(hf_name)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path} is truncated or corrupt ({err}); download it again.") from None
    tied = config.get("tie_word_embeddings", False) or "output.weight" not in weights
    if tied:
        weights.pop("output.weight", None)  # tied: the embeddings serve as output (loading.py ties them)
    for i in range(params.n_layers):
        for key, n_heads in ((f"layers.{i}.attention.wq.weight", params.n_heads),
                             (f"layers.{i}.attention.wk.weight", params.n_kv_heads)):
            if key in weights and weights[key].shape[0] == n_heads * params.head_dim:
                weights[key] = unpermute_rows(weights[key], n_heads)
    return params, weights, file_bytes, tied
