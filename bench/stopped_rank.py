"""How long a rank waits for a peer that was stopped (SIGSTOP: alive, connections open, silent) before it gives up.

    python -m bench.stopped_rank                    # the default timeout (120 s), and 10 s and 30 s
    python -m bench.stopped_rank --timeouts 10 --shutdown-timeout 5   # and torchrun's own grace period

Each run is `torchrun --nproc-per-node 2 run.py` on a tiny random checkpoint (2 layers, Llama 3's vocabulary),
generating for ever; once both ranks generate, rank 1 gets SIGSTOP. The time from SIGSTOP to the launcher's exit
is what a user waits; the time to rank 0's one-sentence error is when a rank noticed. A killed rank is noticed
in seconds (its connections close); a stopped one only when the collective's timeout, $LLAMA3_RAW_RANK_TIMEOUT_S
(parallel.py), runs out; torchrun then waits its --shutdown-timeout (default 30 s) for the stopped rank to obey
SIGTERM before it kills it. Output: one line per timeout and bench/out/stopped-rank[-shutdownN].json.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.tensor_parallel import free_port
from llama3_raw.events import run_tool
from llama3_raw.files import write_bytes, write_json
from llama3_raw.params import params_from_dict
from llama3_raw.parallel import COLLECTIVE_TIMEOUT_S, TIMEOUT_ENV

REPO = Path(__file__).resolve().parent.parent
TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=32, norm_eps=1e-5,
            rope_theta=500000.0)


def tiny_checkpoint(folder: Path) -> Path:
    """Random bf16 weights in Meta's layout, with the official tokenizer (llama_models, a bench-only package)."""
    if (folder / "consolidated.00.pth").is_file():
        return folder
    import llama_models.llama3 as meta_llama3

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).to(torch.bfloat16)
             for key, shape in params_from_dict(TINY).weight_shapes().items()}
    torch.save(state, folder / "consolidated.00.pth")
    write_json(folder / "params.json", TINY)
    write_bytes(folder / "tokenizer.model", (Path(meta_llama3.__file__).parent / "tokenizer.model").read_bytes())
    return folder


def seconds_to_notice(ckpt: Path, timeout_s: float | None, shutdown_s: int | None = None) -> dict:
    """SIGSTOP rank 1 while both generate; seconds until rank 0 says why it stops, and until torchrun exits
    (torchrun then gives the stopped rank --shutdown-timeout seconds, default 30, to exit after SIGTERM, which
    a stopped process never does, before it sends SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if timeout_s is not None:
        env[TIMEOUT_ENV] = f"{timeout_s:g}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *(["--shutdown-timeout", str(shutdown_s)] if shutdown_s is not None
                                                    else []),
               str(REPO / "run.py"), "hello", "--ckpt-dir", str(ckpt),
               "--max-new-tokens", "100000", "--context-len", "8192", "--dtype", "float32"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in launcher.stderr))
    reader.start()
    launcher.stdout.read(len("hello"))  # rank 0 prints the prompt once both ranks generate
    ranks = sorted(int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                      text=True).stdout.split())
    time.sleep(2)
    os.kill(ranks[-1], signal.SIGSTOP)
    stopped = time.perf_counter()
    try:
        launcher.wait(timeout=(timeout_s or COLLECTIVE_TIMEOUT_S) * 3 + 60)
    finally:
        for pid in ranks:
            with_pid(pid, signal.SIGCONT)
            with_pid(pid, signal.SIGKILL)
    exited = time.perf_counter()
    reader.join(timeout=10)
    said_at, said = next(((t, line) for t, line in lines if "did not answer" in line), (exited, ""))
    return {"timeout_s": timeout_s or COLLECTIVE_TIMEOUT_S, "torchrun_shutdown_timeout_s": shutdown_s,
            "rank_0_said_after_s": round(said_at - stopped, 1), "launcher_exited_after_s": round(exited - stopped, 1),
            "exit_code": launcher.returncode, "rank_0_said": said.strip(), "loadavg_1min": os.getloadavg()[0]}


def with_pid(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeouts", type=float, nargs="+", default=[10, 30, COLLECTIVE_TIMEOUT_S])
    parser.add_argument("--shutdown-timeout", type=int, help="torchrun's --shutdown-timeout (default: torchrun's, 30)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)

    def work():
        ckpt = tiny_checkpoint(args.out / "ckpt-tiny-tp")
        results = []
        for timeout_s in args.timeouts:
            result = seconds_to_notice(ckpt, None if timeout_s == COLLECTIVE_TIMEOUT_S else timeout_s,
                                       args.shutdown_timeout)
            results.append(result)
            print(f"{TIMEOUT_ENV}={result['timeout_s']:g}, torchrun --shutdown-timeout "
                  f"{args.shutdown_timeout if args.shutdown_timeout is not None else '(default)'}: rank 0 said so after "
                  f"{result['rank_0_said_after_s']} s, the launcher exited after {result['launcher_exited_after_s']} s "
                  f"(exit {result['exit_code']})", flush=True)
        suffix = f"-shutdown{args.shutdown_timeout}" if args.shutdown_timeout is not None else ""
        write_json(args.out / f"stopped-rank{suffix}.json", results)

    return run_tool(work)


if __name__ == "__main__":
    sys.exit(main())
