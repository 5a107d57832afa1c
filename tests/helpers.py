"""Test helpers: random-weight checkpoints in Meta's exact on-disk format, and Meta's reference model.

Meta's reference (`llama_models.llama3.model.Transformer`, with fairscale at world size 1 on gloo)
is the oracle; it is a test-only dependency.
"""

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import llama_models.llama3 as meta_llama3

OFFICIAL_TOKENIZER = Path(meta_llama3.__file__).parent / "tokenizer.model"
FORTY_TWO_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "

# Llama 3's real vocabulary, so the official tokenizer applies; the rest is tiny.
TINY_GQA = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
TINY_MQA = dict(TINY_GQA, n_heads=4, n_kv_heads=1, n_layers=3, ffn_dim_multiplier=None, multiple_of=16)
TINY_MHA_SCALED = dict(TINY_GQA, n_heads=4, n_kv_heads=4, use_scaled_rope=True, rope_theta=10000.0)


def meta_key_shapes(p: dict) -> dict:
    """Meta's key names, order and shapes, written out independently of llama3_raw.params."""
    dim, n_heads = p["dim"], p["n_heads"]
    n_kv_heads = p.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    hidden = int(2 * 4 * dim / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    hidden = p["multiple_of"] * ((hidden + p["multiple_of"] - 1) // p["multiple_of"])
    shapes = {"tok_embeddings.weight": (p["vocab_size"], dim)}
    for i in range(p["n_layers"]):
        shapes |= {
            f"layers.{i}.attention.wq.weight": (n_heads * head_dim, dim),
            f"layers.{i}.attention.wk.weight": (n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wv.weight": (n_kv_heads * head_dim, dim),
            f"layers.{i}.attention.wo.weight": (dim, n_heads * head_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    shapes |= {"norm.weight": (dim,), "output.weight": (p["vocab_size"], dim)}
    return shapes


def random_state_dict(p: dict, seed: int = 0, dtype=torch.bfloat16, with_output: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in meta_key_shapes(p).items():
        if key == "output.weight" and not with_output:
            continue
        if len(shape) == 1:  # norm weights: random around 1, so a forgotten norm weight shows
            tensor = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            std = 1.0 if key == "tok_embeddings.weight" else shape[1] ** -0.5
            tensor = std * torch.randn(shape, generator=gen)
        state[key] = tensor.to(dtype)
    return state


def write_checkpoint(ckpt_dir: Path, p: dict, state: dict, tokenizer: Path | None = OFFICIAL_TOKENIZER) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt_dir / "consolidated.00.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(p))
    if tokenizer is not None:
        (ckpt_dir / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return ckpt_dir


def write_random_checkpoint(ckpt_dir: Path, p: dict, seed: int = 0, dtype=torch.bfloat16, with_output: bool = True,
                            tokenizer: Path | None = OFFICIAL_TOKENIZER) -> Path:
    return write_checkpoint(ckpt_dir, p, random_state_dict(p, seed, dtype, with_output), tokenizer)


def init_meta_model_parallel() -> None:
    """fairscale wants a process group even for one process: world size 1 on gloo (the project's own set-up)."""
    from llama3_raw.tools.reference import init_model_parallel

    init_model_parallel()


def meta_transformer(p: dict, state: dict, max_seq_len: int = 512, max_batch_size: int = 1, dtype=torch.float32):
    """Meta's reference Transformer with `state` loaded strictly (tied output filled from the embeddings)."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    init_meta_model_parallel()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **p))
    finally:
        torch.set_default_dtype(previous)
    state = dict(state)
    state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def meta_layer_outputs(model, tokens: torch.Tensor, start_pos: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run Meta's forward once; return every block's output (via hooks) and the logits."""
    from llama3_raw.tools.reference import meta_block_outputs

    return meta_block_outputs(model, tokens, start_pos)



def split_like_meta(key: str) -> int | None:
    """Meta's model-parallel split dimension, written out from fairscale's layer types (not from llama3_raw):
    ColumnParallelLinear and VocabParallelEmbedding split dim 0, RowParallelLinear dim 1, norms are copied."""
    if key.endswith("norm.weight"):
        return None
    if ".attention.wo." in key or ".feed_forward.w2." in key:
        return 1
    return 0


def write_sharded_checkpoint(ckpt_dir: Path, p: dict, state: dict, n_shards: int,
                             tokenizer: Path | None = OFFICIAL_TOKENIZER) -> Path:
    """Meta's model-parallel layout: consolidated.00.pth ... with each tensor cut into n_shards slices."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(n_shards):
        shard = {}
        for key, tensor in state.items():
            dim = split_like_meta(key)
            shard[key] = tensor.clone() if dim is None else tensor.chunk(n_shards, dim)[rank].clone()
        torch.save(shard, ckpt_dir / f"consolidated.{rank:02d}.pth")
    (ckpt_dir / "params.json").write_text(json.dumps(p))
    if tokenizer is not None:
        (ckpt_dir / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return ckpt_dir


def fp32_model(ckpt_dir: Path):
    """(weights in float32, params, official tokenizer) for a checkpoint written by these helpers."""
    from llama3_raw import cast_weights, load_checkpoint, load_tokenizer

    ckpt = load_checkpoint(ckpt_dir, show_progress=False)
    return cast_weights(ckpt.weights, torch.float32, "cpu"), ckpt.params, load_tokenizer(OFFICIAL_TOKENIZER)


def spy_on_forward(monkeypatch, module) -> list[torch.Size]:
    """Make `module.forward` record the shape (B, S) of the tokens of every call; returns the list it fills.
    For the decode loop (generate.py), both forwards it may take: model.py's and fast_forward.py's."""
    from llama3_raw import fast_forward
    shapes = []
    for owner in (module, fast_forward) if module.__name__ == "llama3_raw.generate" else (module,):
        def recording_forward(weights, params, tokens, cache=None, real_forward=owner.forward, **kwargs):
            shapes.append(tokens.shape)
            return real_forward(weights, params, tokens, cache, **kwargs)

        monkeypatch.setattr(owner, "forward", recording_forward)
    return shapes


# A training recipe small enough for a test: trains in seconds on a few thousand characters.
TINY_RECIPE = {
    "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
              "rope_theta": 10000.0},
    "tokenizer": {"bpe_ranks": 300},
    "train": {"context": 32, "batch_size": 4, "steps": 20, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3,
              "eval_interval": 10, "eval_windows": 4, "seed": 7},
    "generation": {"prompt": "ROMEO:\n", "max_new_tokens": 20},
}


def changed_copy(good: Path, folder: Path, weights_file: str, change) -> Path:
    """A copy of the saved checkpoint folder `good` whose `weights_file` state dict went through `change`."""
    folder.mkdir()
    for file in ("params.json", "tokenizer.model"):
        (folder / file).write_bytes((good / file).read_bytes())
    state = dict(torch.load(good / weights_file, weights_only=True))
    change(state)
    torch.save(state, folder / weights_file)
    return folder


# A few hundred MB: big enough that a second copy of the weights would stand out from the interpreter's noise.
RSS_SHAPE = dict(TINY_GQA, dim=1024, n_layers=4, n_heads=16, n_kv_heads=4, multiple_of=256)
RSS_PROBE = """
import json, sys
import torch
torch.ones(1) @ torch.ones(1, 1)  # torch's own start-up allocations happen before the baseline
def status(field):  # VmHWM, unlike getrusage's ru_maxrss, does not inherit the parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
{body}
print(json.dumps({{"before": before, "after": status("VmRSS"), "peak": status("VmHWM"), "tokens": len(tokens)}}))
"""


def probe_rss(body: str, ckpt_dir: Path) -> dict:
    """Runs `body` (Python that loads sys.argv[1] and sets `tokens`) in a fresh interpreter: its VmRSS before and
    after, its peak (VmHWM), and len(tokens)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", RSS_PROBE.format(body=body), str(ckpt_dir)], capture_output=True,
                            text=True, cwd=repo, env={"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---- command lines in this process ----

class Called(NamedTuple):
    """What a command line did, as a subprocess.CompletedProcess names it (and unpacks as code, out, err)."""
    returncode: int
    stdout: str
    stderr: str


PYTHON_DEFAULT_IGNORES = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def call(entry: Callable[[list[str]], int], argv: list, capsys) -> Called:
    """A command's main(argv) in this process, as a person runs it but without starting Python and torch again:
    stdout and stderr captured by capsys (what came before is dropped), the exit code from its return value or
    from SystemExit (argparse's errors, sys.exit). Warnings reach stderr under Python's default filters, as in a
    fresh interpreter (pytest would otherwise collect them, and a test that wants one line on stderr would not see
    a second). The commands set torch's thread count for the model they load (threads.py); it is put back, so
    that no later test runs on the count a command chose."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in PYTHON_DEFAULT_IGNORES:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show_on_stderr
            code = entry([str(arg) for arg in argv])
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return Called(code, out, err)


def run_py(argv: list[str]) -> int:
    """`python run.py ARGV`."""
    from llama3_raw.cli import run_script_main

    return run_script_main(argv)


def python_m(argv: list[str]) -> int:
    """`python -m llama3_raw ARGV` (the same command line as the installed llama3-raw, under its own name)."""
    from llama3_raw.cli import main

    return main(argv, prog="python -m llama3_raw")
