"""Training: the loss falls, gradients are right, the loss is Meta's, resume is exact, the export is Meta's format,
and the shipped model loads in Meta's reference code with a good validation loss."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_RECIPE, meta_transformer
from llama3_raw.checkpoints import load_checkpoint
from llama3_raw.model import forward
from llama3_raw.params import params_from_dict
from llama3_raw.tokenizer import load_tokenizer
from llama3_raw.training import train
from llama3_raw.training.state import STATE_FILE
from llama3_raw.training.recipe import TrainSettings, load_recipe
from llama3_raw.training.objective import batch_loss, init_weights, sample_batch

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "tinyshakespeare.txt"
SHIPPED = REPO / "weights" / "shakespeare"



def write_recipe(directory: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(CORPUS.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_corpus) -> Path:
    """One uninterrupted tiny training run, shared by several tests."""
    return train_tiny(tmp_path_factory.mktemp("tiny"), small_corpus)


def train_tiny(work: Path, corpus: Path, **options) -> Path:
    """The tiny recipe trained from the start into work/out."""
    train(load_recipe(write_recipe(work, TINY_RECIPE), corpus), work / "out", show_progress=False, **options)
    return work / "out"


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_loss_falls(tiny_run):
    train_losses = [r["nats_per_token"] for r in read_log(tiny_run) if r["kind"] == "train"]
    val = [r for r in read_log(tiny_run) if r["kind"] == "val"]
    assert len(train_losses) == 2 and len(val) == 2
    assert train_losses[-1] < train_losses[0] - 0.5
    # An untrained model is near-uniform: log(vocab) nats per token; training must beat that clearly.
    assert val[-1]["nats_per_token"] < math.log(300 + 256) - 1.0
    assert val[-1]["full"] and (tiny_run / "loss_curve.png").stat().st_size > 1000


def test_resume_is_bit_identical(tiny_run, small_corpus, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, TINY_RECIPE), small_corpus)
    out = tmp_path / "out"
    train(recipe, out, stop_after=13, show_progress=False)  # not a multiple of the log or eval interval
    interrupted = torch.load(out / STATE_FILE, weights_only=True)
    assert interrupted["step"] == 13
    train(recipe, out, resume=True, show_progress=False)
    resumed = torch.load(out / STATE_FILE, weights_only=True)
    uninterrupted = torch.load(tiny_run / STATE_FILE, weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 20
    for key, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][key], tensor), key
    for slot, state in uninterrupted["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][slot][name], value)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(tiny_run))
    assert (out / "consolidated.00.pth").read_bytes() == (tiny_run / "consolidated.00.pth").read_bytes()


def tiny_params(vocab_size: int):
    return params_from_dict({**TINY_RECIPE["model"], "vocab_size": vocab_size})


def test_gradcheck_float64():
    """Autograd through the functional forward agrees with finite differences (torch.autograd.gradcheck)."""
    params = params_from_dict({"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 16,
                               "multiple_of": 8, "norm_eps": 1e-5, "rope_theta": 10000.0})
    gen = torch.Generator().manual_seed(0)
    weights = {k: (0.3 * torch.randn(s, generator=gen, dtype=torch.float64) if len(s) > 1 else
                   1 + 0.1 * torch.randn(s, generator=gen, dtype=torch.float64)) for k, s in params.weight_shapes().items()}
    tokens = torch.randint(0, 16, (2, 5), generator=gen)
    targets = torch.randint(0, 16, (2, 5), generator=gen)
    names = ("layers.0.attention.wq.weight", "layers.0.attention_norm.weight", "norm.weight")  # 80 inputs keep it fast

    def loss_of(*tensors):
        return batch_loss({**weights, **dict(zip(names, tensors))}, params, tokens, targets)

    inputs = tuple(weights[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(loss_of, inputs, eps=1e-6, atol=1e-5)


def test_batch_loss_equals_meta_cross_entropy():
    params = tiny_params(300 + 256)
    weights = init_weights(params, TrainSettings(init_std=0.1), torch.Generator().manual_seed(1))
    ids = torch.randint(0, 300, (500,), generator=torch.Generator().manual_seed(2))
    inputs, targets = sample_batch(ids, 24, 3, bos_id=300, generator=torch.Generator().manual_seed(3))
    ours = batch_loss(weights, params, inputs, targets)
    meta = meta_transformer(json.loads(json.dumps(params.to_json_dict())),
                            {k: w.detach() for k, w in weights.items()}, max_seq_len=64, max_batch_size=3)
    meta_logits = meta.forward(inputs, 0)  # Meta's reference Transformer, an independent implementation
    expected = F.cross_entropy(meta_logits.reshape(-1, meta_logits.shape[-1]).float(), targets.reshape(-1))
    assert abs(ours.item() - expected.item()) < 1e-5
    assert (inputs[:, 0] == 300).all() and torch.equal(inputs[:, 1:], targets[:, :-1])


def assert_meta_format_and_logits(ckpt_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Loads in our loader and strictly in Meta's Transformer; returns Meta's logits after checking ours match."""
    raw = torch.load(ckpt_dir / "consolidated.00.pth", weights_only=True)
    params_json = json.loads((ckpt_dir / "params.json").read_text())
    assert "max_seq_len" not in params_json
    checkpoint = load_checkpoint(ckpt_dir, show_progress=False)
    assert list(raw) == list(checkpoint.params.weight_shapes()) and not checkpoint.tied_output
    assert all(t.dtype == torch.bfloat16 for t in raw.values())
    assert load_tokenizer(ckpt_dir / "tokenizer.model").n_words == params_json["vocab_size"]
    meta = meta_transformer(params_json, {k: t.float() for k, t in raw.items()}, max_seq_len=tokens.shape[1],
                            max_batch_size=tokens.shape[0])
    meta_logits = meta.forward(tokens, 0)
    ours, _ = forward({k: t.float() for k, t in checkpoint.weights.items()}, checkpoint.params, tokens)
    torch.testing.assert_close(ours, meta_logits, atol=2e-4, rtol=1e-4)
    return meta_logits


def test_export_loads_strictly_in_meta_transformer(tiny_run):
    tokenizer = load_tokenizer(tiny_run / "tokenizer.model")
    tokens = torch.tensor([tokenizer.encode("ROMEO:\nWhat say you?")])
    assert_meta_format_and_logits(tiny_run, tokens)
    assert json.loads((tiny_run / "generation.json").read_text())["prompt"] == "ROMEO:\n"


@pytest.mark.skipif(not (SHIPPED / "consolidated.00.pth").is_file(), reason="the shipped model is not trained yet")
def test_shipped_model_matches_meta_and_has_low_validation_loss():
    """Validation nats/char on slices of the held-out last 10 %, from Meta's reference logits (independent code)."""
    tokenizer = load_tokenizer(SHIPPED / "tokenizer.model")
    text = CORPUS.read_text(encoding="utf-8")
    val_text = text[int(len(text) * 0.9):]
    slices = [val_text[start:start + 500] for start in range(5000, 7000, 500)]  # 4 slices, 2000 characters
    nll, chars = 0.0, 0
    for i, val_slice in enumerate(slices):
        ids = tokenizer.encode(val_slice, bos=True)  # BOS first, as in training and in run.py
        assert len(ids) <= 256 and tokenizer.decode(ids[1:]) == val_slice
        tokens = torch.tensor([ids])
        if i == 0:
            meta_logits = assert_meta_format_and_logits(SHIPPED, tokens)
        else:
            meta_logits = meta_transformer(json.loads((SHIPPED / "params.json").read_text()), {
                k: t.float() for k, t in torch.load(SHIPPED / "consolidated.00.pth", weights_only=True).items()},
                max_seq_len=len(ids)).forward(tokens, 0)
        nll += F.cross_entropy(meta_logits[0, :-1].float(), tokens[0, 1:], reduction="sum").item()
        chars += len(val_slice)
    assert nll / chars < SHIPPED_SLICE_BOUND, nll / chars


# The bound is the first issue's target for the validation split, 1.60 nats/char (the shipped model scores 1.4595
# on the whole split by Meta's code, the one shipped before it 1.538); an untrained model scores ~2.7 (log(1280) / 2.6
# chars per token).
SHIPPED_SLICE_BOUND = 1.60


@pytest.fixture
def run_train_cli(cli):
    """`python -m llama3_raw.train --no-progress ARGS`, in this process (helpers.call)."""
    from llama3_raw import train as train_command

    return lambda *args: cli("--no-progress", *args, entry=train_command.main, cwd=REPO)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr


@pytest.mark.parametrize("change, needle", [
    ({"model": {**TINY_RECIPE["model"], "dim": 30}}, "not divisible by n_heads"),
    ({"model": {**TINY_RECIPE["model"], "n_kv_heads": 3}}, "not divisible by n_kv_heads"),
    ({"tokenizer": {"bpe_ranks": 200}}, "bpe_ranks"),
    ({"train": {**TINY_RECIPE["train"], "context": 100000}}, "train.context"),
])
def test_bad_recipe(tmp_path, small_corpus, change, needle, run_train_cli):
    config = write_recipe(tmp_path, {**TINY_RECIPE, **change})
    result = run_train_cli("--config", config, "--corpus", small_corpus, "--out", tmp_path / "out")
    assert_user_error(result, str(config), needle)
    assert not (tmp_path / "out" / STATE_FILE).exists()


def test_unreadable_corpus(tmp_path, run_train_cli):
    config = write_recipe(tmp_path, TINY_RECIPE)
    result = run_train_cli("--config", config, "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "out")
    assert_user_error(result, "missing.txt")


def test_resume_from_another_recipe_is_refused(tiny_run, small_corpus, tmp_path, run_train_cli):
    out = tmp_path / "out"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_recipe(tmp_path, {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "lr": 1e-3}})
    result = run_train_cli("--config", other, "--corpus", small_corpus, "--out", out, "--resume")
    assert_user_error(result, "different recipe")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing on disk damaged
    # and a fresh run must not overwrite a run in progress either
    result = run_train_cli("--config", other, "--corpus", small_corpus, "--out", out)
    assert_user_error(result, "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(not (SHIPPED / "consolidated.00.pth").is_file(), reason="the shipped model is not trained yet")
def test_run_py_without_arguments_uses_the_shipped_model(cli):
    result = cli("--max-new-tokens", "30", cwd=REPO)  # run.py in this process (the docs' blocks run the script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:\n") and len(result.stdout.strip()) > len("ROMEO:") + 20
    assert "shakespeare" in result.stderr
