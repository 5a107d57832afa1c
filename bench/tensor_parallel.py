"""Tensor parallelism on this machine: decode speed and each rank's peak memory for 1, 2 (and 4) ranks, and
what the collectives cost per token.

    python -m bench.tensor_parallel --shape 1b            # the bench's random checkpoint (written once)
    python -m bench.tensor_parallel --shape 8b --ranks 1 2 4

Each run is `torchrun --nproc-per-node N run.py --json` (gloo, one machine, cores shared out among the
ranks); the collective timing spawns N gloo ranks that all-reduce a (1, 1, dim) bf16 tensor the way a
decode step does: 1 + 2 x n_layers times per token (embedding, after wo, after w2), plus the logits'
all-gather and the token's broadcast.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.__main__ import SHAPES, write_random_checkpoint
from llama3_raw.checkpoints.shards import split_dim

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(ckpt: Path, n_files: int) -> Path:
    """The checkpoint as Meta would ship it for n_files ranks (consolidated.00..NN.pth), written once."""
    folder = ckpt.with_name(f"{ckpt.name}-mp{n_files}")
    if (folder / f"consolidated.{n_files - 1:02d}.pth").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)
    for rank in range(n_files):
        shard = {key: tensor if split_dim(key) is None else tensor.chunk(n_files, split_dim(key))[rank].clone()
                 for key, tensor in state.items()}
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    for name in ("params.json", "tokenizer.model"):
        (folder / name).write_bytes((ckpt / name).read_bytes())
    return folder


def run_ranks(ckpt: Path, n_ranks: int, new_tokens: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(REPO / "run.py"), "--ckpt-dir", str(ckpt),
               "--dtype", "bfloat16", "--max-new-tokens", str(new_tokens), "--json", "hello"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout)


def collective_worker(rank: int, world_size: int, port: int, dim: int, n_layers: int, vocab: int, steps: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    activation = torch.randn(1, 1, dim).to(torch.bfloat16)
    logits = torch.randn(1, 1, vocab // world_size)
    token = torch.zeros(1, dtype=torch.long)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(1 + 2 * n_layers):
            dist.all_reduce(activation)
        dist.all_gather([torch.empty_like(logits) for _ in range(world_size)], logits)
        dist.broadcast(token, src=0)
    per_token = (time.perf_counter() - start) / steps
    if rank == 0:
        out.put(per_token)
    dist.destroy_process_group()


def collective_seconds_per_token(world_size: int, dim: int, n_layers: int, vocab: int, steps: int = 50) -> float:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(collective_worker, args=(world_size, free_port(), dim, n_layers, vocab, steps, queue),
                       nprocs=world_size, join=True, start_method="spawn")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tensor_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--files", type=int, default=1, help="run on the checkpoint cut into this many shard files, "
                        "as Meta ships its big models (written once beside the bench's checkpoint)")
    args = parser.parse_args()
    ckpt = write_random_checkpoint(args.out / f"ckpt-{args.shape}", args.shape)
    if args.files > 1:
        ckpt = write_shards(ckpt, args.files)
    shape = SHAPES[args.shape]
    file_gb = sum(path.stat().st_size for path in ckpt.glob("consolidated.*.pth")) / 1e9
    print(f"{args.shape} shape, {file_gb:.2f} GB bf16 in {args.files} file(s), {os.cpu_count()} cores shared out "
          f"among the ranks")
    print("| ranks | decode tok/s | peak RSS per rank GiB | RSS / (file / ranks) | collectives ms/token |")
    print("|---|---|---|---|---|")
    for n in args.ranks:
        stats = run_ranks(ckpt, n, args.new_tokens)["stats"]
        per_rank = stats.get("peak_rss_mb_per_rank", [stats["peak_rss_mb"]])
        collectives = collective_seconds_per_token(n, shape["dim"], shape["n_layers"], shape["vocab_size"]) if n > 1 else 0
        file_mib = file_gb * 1e9 / 2**20
        print(f"| {n} | {stats['decode_tok_per_s']:.2f} | {', '.join(f'{mib / 1024:.2f}' for mib in per_rank)} | "
              f"{max(per_rank) / (file_mib / n):.2f} | {1e3 * collectives:.2f} |", flush=True)


if __name__ == "__main__":
    main()
