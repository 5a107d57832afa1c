"""Benchmark: peak RSS while merging a model-parallel checkpoint, against the checkpoint's total size.

    python bench/shard_merge.py                      # Llama 3.2 1B shape (untied), 8 shards, ~3 GB bf16
    python bench/shard_merge.py --shape 8b --shards 8

Writes random bf16 shards in Meta's layout (one shard at a time, so writing needs little memory), then
loads them in a fresh process with llama3_raw.load_checkpoint and reports that process's peak RSS,
its RSS before loading (Python + torch), and the shards' total size.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama3_raw.params import params_from_dict  # noqa: E402
from llama3_raw.checkpoints.shards import split_dim  # noqa: E402

SHAPES = {
    # Meta's params.json for Llama 3.2 1B (written here with an untied output) and Llama 3 8B.
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
}

# VmHWM (peak resident set) rather than ru_maxrss, which a child inherits from the parent across exec.
MEASURE = """
import json, sys, time
from pathlib import Path
import torch
from llama3_raw import load_checkpoint
def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024
before = status_mb("VmHWM")
start = time.perf_counter()
ckpt = load_checkpoint(Path(sys.argv[1]), show_progress=False)
seconds = time.perf_counter() - start
peak = status_mb("VmHWM")
print(json.dumps({"rss_before_mb": round(before), "peak_rss_mb": round(peak), "load_s": round(seconds, 1),
                  "merged_mb": round(sum(t.nbytes for t in {id(t): t for t in ckpt.weights.values()}.values()) / 2**20)}))
"""


def write_sharded(folder: Path, shape: str, n_shards: int) -> Path:
    if (folder / "params.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    params = params_from_dict(SHAPES[shape])
    gen = torch.Generator().manual_seed(0)
    for rank in range(n_shards):
        shard = {}
        for key, dims in params.weight_shapes().items():
            dim = split_dim(key)
            piece = list(dims)
            if dim is not None:
                piece[dim] //= n_shards
            if dim is None:
                shard[key] = torch.ones(dims, dtype=torch.bfloat16)  # replicated norms: equal on every shard
            else:
                shard[key] = (torch.randn(piece, generator=gen) * dims[1] ** -0.5).to(torch.bfloat16)
        tmp = folder / f"consolidated.{rank:02d}.pth.tmp"
        torch.save(shard, tmp)
        tmp.rename(folder / f"consolidated.{rank:02d}.pth")
        del shard
    (folder / "params.json").write_text(json.dumps(SHAPES[shape]))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    folder = write_sharded(REPO / "bench" / "out" / f"ckpt-{args.shape}-mp{args.shards}", args.shape, args.shards)
    total_mb = sum(p.stat().st_size for p in folder.glob("consolidated.*.pth")) / 2**20
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, check=True)
    result = json.loads(out.stdout) | {"shape": args.shape, "shards": args.shards, "total_file_mb": round(total_mb)}
    print(json.dumps(result))
    (REPO / "bench" / "out" / f"shard-merge-{args.shape}-mp{args.shards}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
