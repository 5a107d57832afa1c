"""Benchmark: a random-weight checkpoint of a real Llama 3 shape, run through the CLI as a user runs it.

    python bench/run.py --shape 1b            # Llama 3.2 1B shape (2.5 GB bf16 file, tied output)
    python bench/run.py --shape 8b --dtypes bfloat16   # Llama 3 8B shape (16 GB file)

Each measurement is a fresh `run.py --json` process, so load time and peak RSS are per run. Reports
load seconds, peak RSS against the file size, prefill tokens/s for a short and a long prompt, and
decode tokens/s; writes a Markdown table and a JSON file under bench/out/.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama3_raw.params import params_from_dict  # noqa: E402

SHAPES = {
    # Meta's params.json for Llama 3.2 1B and Llama 3 8B.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
}
TIED = {"1b": True, "8b": False}  # Llama 3.2 1B ships without output.weight


def write_random_checkpoint(folder: Path, shape: str) -> Path:
    if (folder / "consolidated.00.pth").is_file():
        return folder
    import llama_models.llama3 as meta_llama3  # bench-only: the official tokenizer file

    folder.mkdir(parents=True, exist_ok=True)
    params = params_from_dict(SHAPES[shape])
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, dims in params.weight_shapes().items():
        if key == "output.weight" and TIED[shape]:
            continue
        if len(dims) == 1:
            state[key] = (1.0 + 0.1 * torch.randn(dims, generator=gen)).to(torch.bfloat16)
        else:
            state[key] = (torch.randn(dims, generator=gen) * dims[1] ** -0.5).to(torch.bfloat16)
    tmp = folder / "consolidated.00.pth.tmp"
    torch.save(state, tmp)
    tmp.rename(folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(SHAPES[shape]))
    (folder / "tokenizer.model").write_bytes((Path(meta_llama3.__file__).parent / "tokenizer.model").read_bytes())
    return folder


def run_once(ckpt: Path, dtype: str, prompt: str, new_tokens: int) -> dict:
    command = [sys.executable, str(REPO / "run.py"), prompt, "--ckpt-dir", str(ckpt), "--dtype", dtype,
               "--max-new-tokens", str(new_tokens), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()

    t0 = time.perf_counter()
    ckpt = write_random_checkpoint(args.out / f"ckpt-{args.shape}", args.shape)
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    file_gb = (ckpt / "consolidated.00.pth").stat().st_size / 1e9
    short_prompt = "the answer to the ultimate question of life, the universe, and everything is "  # 17 tokens
    long_prompt = " hello" * (args.long_prompt - 1)  # " hello" is one token: long_prompt tokens with bos

    rows = []
    for dtype in args.dtypes:
        runs = {"short": [], "long": []}
        for _ in range(args.reps):
            runs["short"].append(run_once(ckpt, dtype, short_prompt, args.new_tokens))
            runs["long"].append(run_once(ckpt, dtype, long_prompt, 1))
        short, long = runs["short"], runs["long"]

        def summary(values):
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        row = {
            "shape": args.shape, "dtype": dtype, "file_gb": round(file_gb, 3),
            "load_s": summary([r["stats"]["load_s"] for r in short]),
            "peak_rss_gb": summary([r["stats"]["peak_rss_mb"] / 1024 for r in short + long]),
            "prefill_tok_s_short": summary([len(r["prompt_tokens"]) / r["stats"]["prefill_s"] for r in short]),
            "prefill_tok_s_long": summary([len(r["prompt_tokens"]) / r["stats"]["prefill_s"] for r in long]),
            "decode_tok_s": summary([r["stats"]["decode_tok_per_s"] for r in short]),
            "prompt_tokens": [len(short[0]["prompt_tokens"]), len(long[0]["prompt_tokens"])],
            "new_tokens": len(short[0]["tokens"]),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def cell(s, fmt):
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"

    table = [
        f"Random-weight Llama 3 {args.shape.upper()} shape, file {file_gb:.2f} GB (bf16); median (min–max) of {args.reps} runs",
        "",
        f"| dtype | load s | peak RSS GB | prefill tok/s ({rows[0]['prompt_tokens'][0]} tok) | "
        f"prefill tok/s ({rows[0]['prompt_tokens'][1]} tok) | decode tok/s ({rows[0]['new_tokens']} tok) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(f"| {r['dtype']} | {cell(r['load_s'], '.2f')} | {cell(r['peak_rss_gb'], '.2f')} | "
                     f"{cell(r['prefill_tok_s_short'], '.1f')} | {cell(r['prefill_tok_s_long'], '.1f')} | "
                     f"{cell(r['decode_tok_s'], '.2f')} |")
    markdown = "\n".join(table)
    (args.out / f"bench-{args.shape}.md").write_text(markdown + "\n")
    (args.out / f"bench-{args.shape}.json").write_text(json.dumps(rows, indent=1))
    print(markdown)


if __name__ == "__main__":
    main()
