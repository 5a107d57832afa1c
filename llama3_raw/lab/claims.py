"""The seeds' claims, measured on this machine: `python -m llama3_raw.lab.claims [--out DIR] [--quick]`.

1. The KV cache: the multiplications and the time of one new token, with and without the cache, as the
   sequence grows (the shipped model; products counted by torch's FlopCounterMode). A seed: "about 66 % of
   the multiplications saved for three tokens".
2. KV-cache bytes per token of MHA and of GQA at Llama 3 8B's shape (the cache new_kv_cache allocates).
3. RMSNorm against LayerNorm at 8B's width, 4096: model.rms_norm and the lab's layer_norm (the same hand-written
   arithmetic, training/variants.py), and torch's fused F.rms_norm and F.layer_norm, timed in alternation.
   A seed: "RMSNorm is 7-64 % faster".
4. What RoPE does that no position does: two prompts with the same tokens in another order, through the shipped
   model with and without RoPE; and the attention score of one query and key as a function of their distance.

Prints a report, and writes DIR/claims.json and DIR/claims.png. Times are medians of alternating repetitions
on a shared machine; the counts and bytes are exact.
"""

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .. import model  # noqa: E402
from ..checkpoints import SHIPPED_MODEL, load_model, open_folder
from ..errors import ArgumentParser
from ..events import run_tool
from ..files import check_writable_folder, write_json, write_png
from ..params import params_from_dict
from ..training.dropout import forward_with
from ..training.variants import VARIANTS, layer_norm

# Meta's params.json for Llama 3 8B (and 3.1 8B, which adds use_scaled_rope)
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
             "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0}
SEQUENCE_LENGTHS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)
REORDERED_PROMPTS = (" the king loves the queen\n", " the queen loves the king\n")


def median_times(functions: dict, repetitions: int, calls: int) -> dict[str, float]:
    """Seconds per call of each function: the median of `repetitions` rounds, the functions taking turns in each
    round, so that whatever else the machine does falls on all of them alike."""
    samples = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm up
    for _ in range(repetitions):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(times) for name, times in samples.items()}


def multiplications(function) -> int:
    """Multiply-adds in the matrix products `function` runs (FlopCounterMode counts 2 flops per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops() // 2


def kv_cache_claim(weights: dict, params, lengths, repetitions: int) -> list[dict]:
    """For the n-th token of a sequence: without a cache the model runs all n positions again (and keeps only the
    last one's logits); with one it runs the new position against the n - 1 cached keys and values."""
    rows = []
    tokens = torch.randint(0, params.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for n in lengths:
            cache = model.new_kv_cache(params, 1, n, torch.float32)
            _, filled = model.forward(weights, params, tokens[:, :n - 1], cache) if n > 1 else (None, cache)

            def without():
                return model.forward(weights, params, tokens[:, :n], last_only=True)

            def with_cache():
                return model.forward(weights, params, tokens[:, n - 1:n], replace(filled, length=n - 1), last_only=True)

            counts = {"without": multiplications(without), "with": multiplications(with_cache)}
            times = median_times({"without": without, "with": with_cache}, repetitions, 3)
            rows.append({"n": n, "mults_without_cache": counts["without"], "mults_with_cache": counts["with"],
                         "saved": 1 - counts["with"] / counts["without"],
                         "ms_without_cache": 1e3 * times["without"], "ms_with_cache": 1e3 * times["with"]})
    return rows


def kv_bytes_claim() -> dict:
    """Bytes the cache of one position takes, in bf16, at 8B's shape with its 8 kv heads and with 32 (MHA)."""
    gqa = params_from_dict(LLAMA3_8B)
    mha = replace(gqa, n_kv_heads=gqa.n_heads)

    def per_token(params) -> int:
        cache = model.new_kv_cache(params, 1, 1, torch.bfloat16, device="meta")  # shapes only, nothing allocated
        return sum(t.numel() * t.element_size() for t in cache.keys + cache.values)

    return {"gqa_bytes_per_token": per_token(gqa), "mha_bytes_per_token": per_token(mha),
            "gqa_gib_at_8192": per_token(gqa) * 8192 / 2**30, "mha_gib_at_8192": per_token(mha) * 8192 / 2**30,
            "n_layers": gqa.n_layers, "n_heads": gqa.n_heads, "n_kv_heads": gqa.n_kv_heads, "head_dim": gqa.head_dim}


def norm_claim(repetitions: int, calls: int) -> list[dict]:
    """RMSNorm and LayerNorm over rows of 8B's width: one row (a decode step) and 512 (a prompt), fp32 and bf16."""
    width, eps = LLAMA3_8B["dim"], LLAMA3_8B["norm_eps"]
    rows = []
    for n_rows in (1, 512):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n_rows, width, generator=torch.Generator().manual_seed(0)).to(dtype)
            weight = torch.ones(width, dtype=dtype)
            functions = {
                "rms_norm (model.py)": lambda: model.rms_norm(x, weight, eps),
                "layer_norm (same style)": lambda: layer_norm(x, weight, eps),
                "F.rms_norm (torch)": lambda: F.rms_norm(x, (width,), weight, eps),
                "F.layer_norm (torch)": lambda: F.layer_norm(x, (width,), weight, None, eps),
            }
            with torch.inference_mode():
                times = median_times(functions, repetitions, max(1, calls // n_rows))
            rows.append({"rows": n_rows, "dtype": str(dtype).removeprefix("torch."),
                         "us": {name: 1e6 * t for name, t in times.items()},
                         "rms_over_layer_hand": times["rms_norm (model.py)"] / times["layer_norm (same style)"],
                         "rms_over_layer_torch": times["F.rms_norm (torch)"] / times["F.layer_norm (torch)"]})
    return rows


def rope_claim(weights: dict, params, tokenizer) -> dict:
    """The same tokens in two orders: how much the last position's first attention output and final logits
    differ, with RoPE and without (the no_rope variant's forward on the same weights)."""
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text, bos=False) for text in REORDERED_PROMPTS]
    assert sorted(prompts[0]) == sorted(prompts[1]) and prompts[0][-1] == prompts[1][-1], "same tokens, same last"
    no_rope = forward_with(None, VARIANTS["no_rope"].swap)
    result = {"prompts": list(REORDERED_PROMPTS), "token_ids": prompts}
    for name, forward in (("rope", model.forward), ("no_rope", no_rope)):
        outputs = []
        for ids in prompts:
            record = {}
            with torch.inference_mode():
                logits, _ = forward(weights, params, torch.tensor([ids]), record=record)
            outputs.append((record["layers.0.attention"][0, -1], logits[0, -1]))
        (attn_a, logits_a), (attn_b, logits_b) = outputs
        result[name] = {"layer0_attention_max_diff": (attn_a - attn_b).abs().max().item(),
                        "logits_max_diff": (logits_a - logits_b).abs().max().item(),
                        "top_token": [tokenizer.decode([int(logits_a.argmax())]), tokenizer.decode([int(logits_b.argmax())])]}
    return result


def score_by_distance(head_dim: int, theta: float, distances: list[int], offsets=(0, 1000, 5000)) -> dict:
    """q . k after RoPE, for one random query and key (and q = k), at query position m + d and key position m:
    the score depends on d alone (every offset m gives the same curve), and for q = k it falls off with d."""
    params = params_from_dict({"dim": head_dim, "n_layers": 1, "n_heads": 1, "vocab_size": 1, "norm_eps": 1e-5,
                               "rope_theta": theta})
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)

    def score(query, key, m: int, d: int) -> float:
        rotations = model.rope_rotations(params, torch.tensor([m + d, m]))  # (2, Dh/2)
        rotated = model.apply_rope(torch.stack([query, key])[None, :, None, :], rotations)[0, :, 0]  # (2, Dh)
        return float(rotated[0] @ rotated[1])

    curves = {f"q.k at offset {m}": [score(q, k, m, d) for d in distances] for m in offsets}
    first = curves[f"q.k at offset {offsets[0]}"]
    spread = max(abs(a - b) for curve in curves.values() for a, b in zip(curve, first))
    return {"distances": distances, "curves": curves, "same_at_every_offset_max_diff": spread,
            "q_equals_k": [score(q, q, 0, d) for d in distances], "no_rope_score": float(q @ k),
            "head_dim": head_dim, "rope_theta": theta}


def plot(claims: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), dpi=100)
    rows = claims["kv_cache"]
    ns = [r["n"] for r in rows]
    axes[0].loglog(ns, [r["mults_without_cache"] for r in rows], "o-", label="multiplications, no cache")
    axes[0].loglog(ns, [r["mults_with_cache"] for r in rows], "o-", label="multiplications, KV cache")
    axes[0].set_xlabel("position of the new token (sequence length)")
    axes[0].set_ylabel("multiply-adds for that token")
    twin = axes[0].twinx()
    twin.loglog(ns, [r["ms_without_cache"] for r in rows], "s:", color="tab:red", label="ms, no cache")
    twin.loglog(ns, [r["ms_with_cache"] for r in rows], "s:", color="tab:green", label="ms, KV cache")
    twin.set_ylabel("ms per token (this machine)")
    axes[0].legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    axes[0].set_title("one new token, shipped model")
    score = claims["rope_distance"]
    for name, curve in score["curves"].items():
        axes[1].plot(score["distances"], curve, label=name, alpha=0.7)
    axes[1].axhline(score["no_rope_score"], color="gray", linestyle="--", label="no RoPE: the same at every distance")
    axes[1].set_xlabel("distance between query and key (positions)")
    axes[1].set_ylabel("q . k")
    axes[1].set_title(f"RoPE: a score of the distance alone (Dh {score['head_dim']}, θ {score['rope_theta']:g})")
    axes[1].legend(fontsize=8)
    axes[2].plot(score["distances"], score["q_equals_k"], color="tab:purple")
    axes[2].set_xscale("symlog")
    axes[2].set_xlabel("distance (positions)")
    axes[2].set_ylabel("q . q after rotating one of them")
    axes[2].set_title("q = k: the score falls off with distance")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def report(claims: dict) -> str:
    lines = ["1. KV cache, one new token of the shipped model (multiply-adds in the products; ms: median, this machine)",
             f"   {'n':>5} {'no cache':>12} {'KV cache':>10} {'saved':>7} {'ms no cache':>12} {'ms KV cache':>12}"]
    for r in claims["kv_cache"]:
        lines.append(f"   {r['n']:>5} {r['mults_without_cache']:>12,} {r['mults_with_cache']:>10,} {r['saved']:>7.1%} "
                     f"{r['ms_without_cache']:>12.2f} {r['ms_with_cache']:>12.2f}")
    three = [r for r in claims["kv_cache"] if r["n"] <= 3]
    total_without, total_with = sum(r["mults_without_cache"] for r in three), sum(r["mults_with_cache"] for r in three)
    lines.append(f"   three tokens in all (n = 1, 2, 3): {total_without:,} without, {total_with:,} with the cache: "
                 f"{1 - total_with / total_without:.1%} saved; the third token alone: {three[-1]['saved']:.1%}")
    kv = claims["kv_bytes"]
    lines += [f"2. KV cache at Llama 3 8B's shape ({kv['n_layers']} layers, head_dim {kv['head_dim']}, bf16): "
              f"GQA ({kv['n_kv_heads']} kv heads) {kv['gqa_bytes_per_token']:,} bytes/token "
              f"({kv['gqa_gib_at_8192']:.2f} GiB at 8192 tokens); MHA ({kv['n_heads']}) {kv['mha_bytes_per_token']:,} "
              f"({kv['mha_gib_at_8192']:.2f} GiB): {kv['mha_bytes_per_token'] / kv['gqa_bytes_per_token']:.0f}x",
              "3. RMSNorm vs LayerNorm at width 4096 (microseconds per call, median)"]
    for r in claims["norms"]:
        times = ", ".join(f"{name} {us:.1f}" for name, us in r["us"].items())
        lines.append(f"   {r['rows']:>3} rows {r['dtype']:<8}: {times}; RMSNorm's time / LayerNorm's: "
                     f"{r['rms_over_layer_hand']:.2f} hand-written, {r['rms_over_layer_torch']:.2f} torch's")
    rope = claims["rope_reordered"]
    lines += [f"4. RoPE, the same tokens reordered: {rope['prompts'][0]!r} vs {rope['prompts'][1]!r}"]
    for name in ("rope", "no_rope"):
        r = rope[name]
        lines.append(f"   {name:<8}: last position's layer-0 attention output differs by at most "
                     f"{r['layer0_attention_max_diff']:.2e}; its logits by {r['logits_max_diff']:.2e}; "
                     f"next token {r['top_token'][0]!r} vs {r['top_token'][1]!r}")
    score = claims["rope_distance"]
    lines.append(f"   attention score vs distance: the same at query positions shifted by 0, 1000, 5000 within "
                 f"{score['same_at_every_offset_max_diff']:.1e}; q = k: {score['q_equals_k'][0]:.1f} at distance 0, "
                 f"{score['q_equals_k'][score['distances'].index(64)]:.1f} at 64, "
                 f"{score['q_equals_k'][-1]:.1f} at {score['distances'][-1]}")
    return "\n".join(lines)


def measure(quick: bool) -> dict:
    folder = open_folder(SHIPPED_MODEL)
    loaded = load_model(folder, dtype="float32", show_progress=False)
    weights, params = loaded.weights, replace(loaded.params, max_seq_len=1024)
    repetitions = 3 if quick else 15
    lengths = SEQUENCE_LENGTHS[:6] if quick else SEQUENCE_LENGTHS
    distances = list(range(0, 257 if quick else 1025))
    print("measuring the KV cache ...", file=sys.stderr, flush=True)
    kv_cache = kv_cache_claim(weights, params, lengths, repetitions)
    print("measuring RMSNorm and LayerNorm ...", file=sys.stderr, flush=True)
    norms = norm_claim(repetitions, 20 if quick else 400)
    print("measuring RoPE ...", file=sys.stderr, flush=True)
    return {"kv_cache": kv_cache, "kv_bytes": kv_bytes_claim(), "norms": norms,
            "rope_reordered": rope_claim(weights, params, loaded.tokenizer),
            "rope_distance": score_by_distance(128, LLAMA3_8B["rope_theta"], distances),
            "threads": torch.get_num_threads(), "quick": quick}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m llama3_raw.lab.claims", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / "claims",
                        help="folder for claims.json and claims.png (default runs/claims)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and lengths: seconds, rougher times")
    args: argparse.Namespace = parser.parse_args(argv)

    def work():
        check_writable_folder(args.out, "--out")
        torch.set_num_threads(1)  # one thread: on a shared machine the steadiest times (threads.py)
        claims = measure(args.quick)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "claims.json", claims)
        plot(claims, args.out / "claims.png")
        print(report(claims))
        print(f"wrote {args.out / 'claims.json'}, {args.out / 'claims.png'}", file=sys.stderr)

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
