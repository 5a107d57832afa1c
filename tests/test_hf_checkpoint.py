"""Hugging Face checkpoints (config.json + safetensors) against transformers' own LlamaForCausalLM.

Oracle: transformers' LlamaForCausalLM (test-only) with random weights, saved by its own save_pretrained.
Hugging Face computes RoPE on rotated halves with cos/sin where we rotate interleaved pairs as complex
numbers, so float32 results differ in the last bits: logits (values O(1)) must agree within 1e-4 absolute.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import OFFICIAL_TOKENIZER
from llama3_raw import cast_weights, forward, load_checkpoint
from llama3_raw.checkpoints.huggingface import unpermute_rows

HF_ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
LLAMA_31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
LLAMA_32_ROPE = dict(LLAMA_31_ROPE, factor=32.0)  # what Llama 3.2 1B/3B's config.json says


def hf_model(vocab_size=512, tie=False, rope_scaling=None, n_kv_heads=2, seed=0, eos=None):
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling,
        max_position_embeddings=131072 if rope_scaling else 8192, tie_word_embeddings=tie,
        eos_token_id=eos, bos_token_id=128000 if vocab_size > 128000 else 1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init is tiny; bigger weights make a comparison that can fail
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 1.0 if "embed" in name else param.shape[-1] ** -0.5)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def our_logits(ckpt_dir, tokens):
    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    logits, _ = forward(cast_weights(ckpt.weights, torch.float32, "cpu"), ckpt.params, tokens)
    return logits, ckpt


def to_legacy_config(ckpt_dir: Path) -> None:
    """Rewrite transformers 5's rope_parameters as the rope_theta + rope_scaling of the files on the Hub."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    if "rope_parameters" not in config:  # transformers 4 already writes the legacy form
        return
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
    (ckpt_dir / "config.json").write_text(json.dumps(config))


def test_indexed_untied_gqa_matches_transformers(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # several files and model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ours, ckpt = our_logits(tmp_path, tokens)
    theirs = hf_logits(model, tokens)
    torch.testing.assert_close(ours, theirs, atol=HF_ATOL, rtol=0)
    assert theirs.abs().max() > 1.0 and not ckpt.tied_output and ckpt.source_format == "huggingface"
    assert not ckpt.params.use_scaled_rope and ckpt.params.ffn_hidden_dim == 176


@pytest.mark.parametrize("rope", [LLAMA_31_ROPE, LLAMA_32_ROPE], ids=["3.1-factor-8", "3.2-factor-32"])
def test_tied_scaled_rope_legacy_config_matches_transformers(tmp_path, rope):
    model = hf_model(tie=True, rope_scaling=rope, n_kv_heads=4)
    model.save_pretrained(tmp_path)  # one model.safetensors, no lm_head (tied)
    to_legacy_config(tmp_path)
    tokens = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(2))  # long: scaling matters
    ours, ckpt = our_logits(tmp_path, tokens)
    torch.testing.assert_close(ours, hf_logits(model, tokens), atol=HF_ATOL, rtol=0)
    assert ckpt.tied_output and ckpt.weights["output.weight"] is ckpt.weights["tok_embeddings.weight"]
    assert ckpt.params.use_scaled_rope and ckpt.params.rope_scaling_factor == rope["factor"]
    assert ckpt.params.context_len == 131072


def test_factor_32_is_not_silently_meta_factor_8(tmp_path):
    """Llama 3.2's factor 32 must change the result: loading it as Meta's hard-coded 8 would be wrong."""
    from dataclasses import replace

    model = hf_model(tie=True, rope_scaling=LLAMA_32_ROPE)
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(3))
    ckpt = load_checkpoint(tmp_path, show_progress=False)
    weights = cast_weights(ckpt.weights, torch.float32, "cpu")
    with_8, _ = forward(weights, replace(ckpt.params, rope_scaling_factor=8.0), tokens)
    assert (with_8 - hf_logits(model, tokens)).abs().max() > 100 * HF_ATOL


def test_weights_are_memory_mapped_except_q_and_k(tmp_path):
    hf_model().save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path, show_progress=False)
    path = (tmp_path / "model.safetensors").resolve()
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path):
            ranges.append(tuple(int(x, 16) for x in parts[0].split("-")))
    for key, tensor in ckpt.weights.items():
        mapped = any(start <= tensor.data_ptr() < end for start, end in ranges)
        assert mapped == (".wq." not in key and ".wk." not in key), key


def test_unpermute_inverts_hugging_faces_permute():
    """HF's convert_llama_weights_to_hf.py `permute`, restated: per head, even rows first, then odd rows."""
    n_heads, head_dim, dim = 3, 8, 5
    meta = torch.arange(n_heads * head_dim * dim, dtype=torch.float32).view(n_heads * head_dim, dim)
    hf = torch.cat([torch.cat([meta[h * head_dim:(h + 1) * head_dim:2], meta[h * head_dim + 1:(h + 1) * head_dim:2]])
                    for h in range(n_heads)])
    assert torch.equal(unpermute_rows(hf, n_heads), meta)


def test_cli_reads_original_tokenizer_and_greedy_tokens_match_transformers(tmp_path, cli):
    """A Hub-style folder: config.json + safetensors, Meta's tokenizer.model in original/."""
    model = hf_model(vocab_size=128256, eos=128009)
    model.save_pretrained(tmp_path)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(OFFICIAL_TOKENIZER.read_bytes())
    result = cli("--ckpt-dir", tmp_path, "--max-new-tokens", "8", "--dtype", "float32", "--json", cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    with torch.no_grad():
        expected = model.generate(torch.tensor([out["prompt_tokens"]]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=[128001, 128008, 128009])[0, len(out["prompt_tokens"]):].tolist()
    expected = [t for t in expected if t not in (128001, 128008, 128009)]
    assert out["tokens"] == expected and len(expected) > 0
