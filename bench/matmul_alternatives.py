"""What each available one-row product reads per second: the decode step's matrix-vector products alone.

    python -m bench.matmul_alternatives                 # 1B shapes, 2 threads, 3 rounds
    python -m bench.matmul_alternatives --torchao DIR   # also torchao's weight-only configs (pip install --target DIR)

Decoding one token multiplies one row of activations by every weight matrix once, so each product's speed is
the speed at which it reads its weights. For every matrix shape of the Llama 3.2 1B model this times, in
rounds that alternate the candidates (the VM's bandwidth drifts within minutes), each way of computing
x @ W.T that PyTorch and this project offer -- PyTorch's own bf16 matrix-vector product, oneDNN's, inductor's
C++ GEMM template (torch.compile, max-autotune; compiled once per shape, so without freezing's
weight prepacking, which would compile every copy), the int8 and int4 kernels, and torchao -- over enough
copies of the matrix (>= 512 MB) that none stays in the 32 MB cache, as in a real decode step. Reports GB/s
of weights read, beside a read-bandwidth probe of the same round. Output: bench/out/matmul-alternatives.md.

Also: this project's compiled kernels (llama3_raw/compiled.py) where built. A first attempt at them
(2026-11-25) read 22.2 GB/s against PyTorch's 28.8 and was dropped -- it had been compiled without OpenMP, so
its `at::parallel_for` ran on one thread; built with it, the same kind of kernel reads at the machine's bandwidth.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.worker import read_bandwidth
from llama3_raw import compiled, kernels
from llama3_raw.quantize import quantize_int4, quantize_int8

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"wq, wo": (2048, 2048), "wk, wv": (512, 2048), "w1, w3": (8192, 2048), "w2": (2048, 8192),
          "output": (128256, 2048)}  # (out, in) of Llama 3.2 1B's matrices
COPIES_BYTES = 512 << 20  # bf16 bytes of copies per shape, far beyond the cache


def candidates(torchao_dir: str | None) -> dict:
    """name -> (prepare(w_bf16) -> weight object, multiply(x, weight), bytes of the weight object)."""
    import torch._inductor.config as inductor_config
    inductor_config.max_autotune, inductor_config.max_autotune_gemm_backends = True, "CPP,ATEN"
    inductor_product = torch.compile(lambda x, w: x @ w.T, dynamic=False)  # compiled once per shape, on first call

    def pytorch_bf16(x, w):
        with kernels.without_onednn():
            return x @ w.T

    def in_pytorchs_arrangement(group_size):
        def prepare(w):
            with compiled_off():  # PyTorch's int4 kernel's arrangement, not the compiled kernels' plain layout
                return quantize_int4(w, group_size).to("cpu")
        return prepare

    out = {
        "bf16 PyTorch (oneDNN off)": (lambda w: w, pytorch_bf16, None),
        "bf16 oneDNN": (lambda w: w, lambda x, w: x @ w.T, None),
        "bf16 inductor max-autotune (CPP, ATen)": (lambda w: w, inductor_product, None),
        "int8 _weight_int8pack_mm": (quantize_int8, lambda x, w: torch._weight_int8pack_mm(x, w.values, w.scales), None),
        "int4 g32 _weight_int4pack_mm_for_cpu": (in_pytorchs_arrangement(32), kernels.int4_matmul, None),
        "int4 g128 _weight_int4pack_mm_for_cpu": (in_pytorchs_arrangement(128), kernels.int4_matmul, None),
    }
    if compiled.usable():
        out.update({
            "bf16 compiled (vdpbf16ps)": (lambda w: w, kernels.matmul, None),
            "int8 compiled (int16 activations, vpdpwssd)": (quantize_int8, kernels.matmul, None),
            "int4 g32 compiled (int8 activations, vpdpbusd)": (lambda w: quantize_int4(w, 32).to("cpu"), kernels.matmul, None),
            "int4 g128 compiled": (lambda w: quantize_int4(w, 128).to("cpu"), kernels.matmul, None),
        })
    if torchao_dir:
        sys.path.insert(0, torchao_dir)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def torchao_linear(config):
            def prepare(w):
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).to(torch.bfloat16).eval()
                linear.weight.data = w
                quantize_(linear, config)
                return linear
            return prepare
        out["int8 torchao Int8WeightOnly"] = (torchao_linear(Int8WeightOnlyConfig()), lambda x, m: m(x), "int8")
        # (torchao 0.18's Int4WeightOnlyConfig has no CPU layout any more: its packing formats are for CUDA and XPU.)
    return out


@contextlib.contextmanager
def compiled_off():
    saved = os.environ.get(compiled.SWITCH_ENV)
    os.environ[compiled.SWITCH_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[compiled.SWITCH_ENV]
        else:
            os.environ[compiled.SWITCH_ENV] = saved


def weight_bytes(weight, kind: str | None, shape: tuple[int, int]) -> int:
    if kind == "bf16":
        return 2 * shape[0] * shape[1]
    if kind == "int8":
        return shape[0] * shape[1] + 2 * shape[0]
    if kind == "int4":  # 4 bits a weight, a bf16 scale and zero per 128
        return shape[0] * shape[1] // 2 + 4 * shape[0] * shape[1] // 128
    return weight.nbytes


def time_candidate(prepare, multiply, kind, originals: list[torch.Tensor], seconds: float = 1.0) -> float:
    """GB/s of weights read by `multiply` over `originals` (copies of a random matrix) in its own form."""
    weights = [prepare(w) for w in originals]
    x = torch.randn(1, originals[0].shape[1]).to(torch.bfloat16)
    with torch.no_grad():
        for w in weights[:2]:
            multiply(x, w)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for w in weights:
                multiply(x, w)
            calls += len(weights)
        elapsed = time.perf_counter() - start
    return calls * weight_bytes(weights[0], kind, tuple(originals[0].shape)) / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.matmul_alternatives", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torchao", help="a folder holding torchao (pip install --no-deps --target DIR torchao)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = candidates(args.torchao)
    results: dict[tuple[str, str], list[float]] = {}
    bandwidths = []
    for round_ in range(args.rounds):
        for shape_name, shape in SHAPES.items():
            copies = max(2, COPIES_BYTES // (2 * shape[0] * shape[1]))
            originals = [(torch.randn(shape) * shape[1] ** -0.5).to(torch.bfloat16) for _ in range(copies)]
            for name, (prepare, multiply, kind) in found.items():
                results.setdefault((shape_name, name), []).append(time_candidate(prepare, multiply, kind, originals))
            bandwidths.append(read_bandwidth(args.threads) / 1e9)
            print(f"round {round_ + 1}, {shape_name}: " + ", ".join(
                f"{name} {results[(shape_name, name)][-1]:.1f}" for name in found) + f"; probe {bandwidths[-1]:.1f} GB/s",
                file=sys.stderr)
    lines = [f"GB/s of weights read by one-row products (x @ W.T, bf16 activations), {args.threads} threads, median of "
             f"{args.rounds} rounds; read-bandwidth probe over the same rounds: median {statistics.median(bandwidths):.1f}, "
             f"range {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s.", "",
             "| product | " + " | ".join(f"{n} {s[0]}x{s[1]}" for n, s in SHAPES.items()) + " |",
             "|---|" + "---|" * len(SHAPES)]
    for name in found:
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(results[(s, name)]):.1f}" for s in SHAPES) + " |")
    out = REPO / "bench" / "out" / "matmul-alternatives.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
