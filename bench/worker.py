"""One benchmark measurement in its own process, so that peak RSS belongs to one implementation.

    python -m bench.worker --impl ours|ours-int8|ours-int4|ours-int4-g64|meta|hf --dtype bfloat16 --ckpt DIR --threads 2
    python -m bench.worker --impl ours-gguf-int4 --dtype bfloat16 --ckpt q4_0.gguf --threads 2   # bench/gguf_rows.py

Prints one JSON object: load seconds, peak RSS, prefill seconds for a long and a short prompt, decode
tokens/s, the bytes of weights one decoded token reads, and the read bandwidth measured right after decoding. Every implementation gets the same
memory-mapped tensors from this project's loader (bf16 used as they are; fp32 converted once), and
Meta's and Hugging Face's models are built on the meta device and handed those tensors with
`assign=True`, so their load time and memory measure the same zero-copy loading as ours and the
comparison is about the forward pass. Each one decodes greedily with its own KV cache. The "ours-gguf-*"
implementations open a GGUF file as run.py does (open_folder, load_model: dequantized, or kept as int4), so
their load time is everything run.py pays before its first token but the tokenizer.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from llama3_raw.generate import generate
from llama3_raw.checkpoints import cast_weights, load_checkpoint
from llama3_raw.params import ModelParams
from llama3_raw.checkpoints.placement import in_huge_pages
from llama3_raw.quantize import quantize_weights

from bench.gguf_rows import GGUF_IMPLS, load_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OURS = ("ours", "ours-int8", "ours-int4", "ours-int4-g64")  # this project: bf16/fp32, then saved quantized folders
WARMUP_PROMPT = [128000, 1, 2, 3, 4]  # first calls pay one-off costs (page faults, kernel set-up): not timed


def memory_status(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes. VmHWM, not getrusage's ru_maxrss: that one
    keeps the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def bytes_read_per_token(weights: dict) -> int:
    """Every matrix is read once per decoded token; of the embeddings only one row (ignored) unless the
    same tensor is also the output matrix. Distinct tensors are counted once."""
    distinct = {}
    for key, w in weights.items():
        if key == "tok_embeddings.weight" and w is not weights.get("output.weight"):
            continue
        distinct[id(w)] = w.nbytes
    return sum(distinct.values())


def read_bandwidth(threads: int, gib: float = 0.5, repeats: int = 7) -> float:
    """Bytes/s of the fastest of several sums over a float32 tensor far larger than the caches (32 MB L3).

    A sum reads every byte once and writes nothing, as decoding reads its weights; the best repeat
    is the machine's reachable read bandwidth at this thread count.
    """
    torch.set_num_threads(threads)
    data = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def time_generation(prefill, decode_step, prompt: list[int], decode_steps: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for greedy decoding: prefill returns the first token, then
    `decode_steps` more come one at a time. `.item()` on each token synchronises a GPU."""
    start = time.perf_counter()
    token = prefill(prompt)
    prefilled = time.perf_counter()
    for step in range(decode_steps):
        token = decode_step(token, len(prompt) + step)
    return prefilled - start, time.perf_counter() - prefilled


def ours(weights: dict, params: ModelParams, dtype: torch.dtype, device: str):
    """This project's generate(): the same code path run.py uses."""
    state = {}

    def prefill(prompt):
        state["stream"] = generate(weights, params, prompt, 1 + state["steps"], stop_ids=(), cache_dtype=dtype,
                                   device=device)
        return next(state["stream"])

    def decode_step(_token, _position):
        return next(state["stream"])

    return prefill, decode_step, state


def meta_reference(weights: dict, params: ModelParams, max_seq_len: int):
    from llama3_raw.tools.reference import meta_transformer

    model = meta_transformer(params, weights, max_seq_len=max_seq_len)

    def prefill(prompt):
        logits = model.forward(torch.tensor([prompt], device=weights["norm.weight"].device), 0)  # Meta's: all positions
        return int(logits[0, -1].argmax())

    def decode_step(token, position):
        logits = model.forward(torch.tensor([[token]], device=weights["norm.weight"].device), position)
        return int(logits[0, -1].argmax())

    return prefill, decode_step


def hf_state_dict(weights: dict, params: ModelParams) -> dict:
    """Meta's names -> Hugging Face's, with wq/wk rows permuted to Hugging Face's half-split RoPE layout
    (the inverse of hf_checkpoint.unpermute_rows; those two matrices are copied, nothing else is)."""
    def permute_rows(w, n_heads):
        rows, cols = w.shape
        head_dim = rows // n_heads
        return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, 2, d/2, D)

    names = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    state = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"],
             "lm_head.weight": weights["output.weight"]}
    for i in range(params.n_layers):
        for meta_name, hf_name in names.items():
            w = weights[f"layers.{i}.{meta_name}"]
            if meta_name == "attention.wq.weight":
                w = permute_rows(w, params.n_heads)
            elif meta_name == "attention.wk.weight":
                w = permute_rows(w, params.n_kv_heads)
            state[f"model.layers.{i}.{hf_name}"] = w
    return state


def hf_config(params: ModelParams, dtype: torch.dtype, tied: bool):
    """The transformers LlamaConfig of `params` (Llama 3.1 RoPE scaling when use_scaled_rope)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": params.rope_theta}
    if params.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": params.rope_theta, "factor": params.rope_scaling_factor,
                "low_freq_factor": params.rope_low_freq_factor, "high_freq_factor": params.rope_high_freq_factor,
                "original_max_position_embeddings": params.rope_original_context}
    config = LlamaConfig(
        vocab_size=params.vocab_size, hidden_size=params.dim, intermediate_size=params.ffn_hidden_dim,
        num_hidden_layers=params.n_layers, num_attention_heads=params.n_heads, num_key_value_heads=params.n_kv_heads,
        rms_norm_eps=params.norm_eps, max_position_embeddings=params.context_len, rope_parameters=rope,
        tie_word_embeddings=tied, torch_dtype=dtype, architectures=["LlamaForCausalLM"])
    return config


def hugging_face(weights: dict, params: ModelParams, dtype: torch.dtype, tied: bool):
    from transformers import DynamicCache, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = hf_config(params, dtype, tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(hf_state_dict(weights, params), strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were made on the meta device
    model.eval()
    device = weights["norm.weight"].device
    state = {}

    @torch.inference_mode()
    def prefill(prompt):
        state["cache"] = DynamicCache(config=config)
        out = model(torch.tensor([prompt], device=device), cache=state["cache"], use_cache=True,
                    logits_to_keep=1)  # what generate() asks for: the last position's logits
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode_step(token, _position):
        out = model(torch.tensor([[token]], device=device), cache=state["cache"], use_cache=True,
                    logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    return prefill, decode_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=[*OURS, *GGUF_IMPLS, "meta", "hf"], required=True)
    parser.add_argument("--dtype", choices=DTYPES, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--short-prompt", type=int, default=17)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    baseline_rss = memory_status("VmRSS")  # the interpreter with torch: what every implementation pays anyway
    start = time.perf_counter()
    if args.impl in GGUF_IMPLS:  # the library's own way in, as run.py: placed in 2 MiB pages, quantized or kept
        weights, params, file_bytes = load_gguf(args.impl, args.ckpt, args.dtype, args.device)
    else:
        checkpoint = load_checkpoint(args.ckpt, show_progress=False)
        params, file_bytes = checkpoint.params, checkpoint.file_bytes
        weights = cast_weights(checkpoint.weights, dtype, args.device)
    if args.impl in OURS[1:]:  # a saved int8 / int4 folder: its matrices stay so
        weights = quantize_weights(weights, dtype)
    if args.impl in OURS and args.device == "cpu":  # as load_model places them
        weights = in_huge_pages(weights)
    max_seq_len = args.long_prompt + args.decode_steps + 8
    if args.impl in OURS or args.impl in GGUF_IMPLS:
        prefill, decode_step, state = ours(weights, params, dtype, args.device)
    elif args.impl == "meta":
        prefill, decode_step = meta_reference(weights, params, max_seq_len)
        state = {}
    else:
        prefill, decode_step = hugging_face(weights, params, dtype, checkpoint.tied_output)
        state = {}
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start

    # Token ids from the middle of the vocabulary; the weights are random, so any ids do (within a small
    # test vocabulary: modulo its size; Llama 3's 128,256 keeps them as they are).
    short = [i % params.vocab_size for i in [128000] + [1000 + i for i in range(args.short_prompt - 1)]]
    long = [i % params.vocab_size for i in [128000] + [2000 + i % 5000 for i in range(args.long_prompt - 1)]]
    state["steps"] = 2
    time_generation(prefill, decode_step, [i % params.vocab_size for i in WARMUP_PROMPT], 2)
    state["steps"] = 0
    long_prefill_s, _ = time_generation(prefill, decode_step, long, 0)
    state["steps"] = args.decode_steps
    short_prefill_s, decode_s = time_generation(prefill, decode_step, short, args.decode_steps)
    peak_rss = memory_status("VmHWM")  # before the bandwidth probe allocates its buffer
    # The machine's bandwidth drifts by 2x within a minute (other guests on the host), so it is read
    # again right after the decode it is compared with (when cpu, where a sum is the read probe).
    bandwidth = read_bandwidth(args.threads) if args.device == "cpu" else None

    result = {
        "impl": args.impl, "dtype": args.dtype, "threads": args.threads, "load_s": load_s,
        "peak_rss_bytes": peak_rss, "baseline_rss_bytes": baseline_rss, "file_bytes": file_bytes,
        "bandwidth_after_decode": bandwidth,
        "bytes_per_token": bytes_read_per_token(weights),
        "prefill_short_tok_s": args.short_prompt / short_prefill_s,
        "prefill_long_tok_s": args.long_prompt / long_prefill_s,
        "decode_tok_s": args.decode_steps / decode_s, "decode_steps": args.decode_steps,
        "kv_cache_bytes": 2 * params.n_layers * max_seq_len * params.n_kv_heads * params.head_dim * dtype.itemsize,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
