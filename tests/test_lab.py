"""The lab (issue 30): the character tokenizer, the variants linked from outside model.py, the ladder's runs.

Independent sources: the seeds' own `stoi` (`sorted(set(text))`) for the character tokenizer, Meta's
`llama_models` Tokenizer for the file format, torch's F.layer_norm for the LayerNorm, and the arithmetic of
8B's params.json for the KV-cache bytes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from helpers import call, python_m
from llama3_raw import model, train_tokenizer
from llama3_raw.errors import UserError
from llama3_raw.lab import ladder
from llama3_raw.lab.__main__ import main as lab_main
from llama3_raw.params import params_from_dict
from llama3_raw.tokenizer import load_tokenizer
from llama3_raw.training.dropout import forward_with
from llama3_raw.training.objective import init_weights
from llama3_raw.training.recipe import TrainSettings, recipe_from_raw
from llama3_raw.training.variants import VARIANTS, layer_norm, relu_feed_forward, relu_shapes

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
TINY = {"model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
                  "rope_theta": 10000.0},
        "tokenizer": {"bpe_ranks": 300}, "data": {"val_fraction": 0.1},
        "train": {"context": 32, "batch_size": 4, "steps": 4, "warmup_steps": 1, "eval_interval": 2, "eval_windows": 2},
        "generation": {"prompt": "ROMEO:\n", "max_new_tokens": 8, "temperature": 0.8}}


def char_tokenizer_file(tmp_path: Path, text: str, cli_call) -> Path:
    source, out = tmp_path / "text.txt", tmp_path / "chars.model"
    source.write_text(text, encoding="utf-8")
    result = cli_call(train_tokenizer.main, ["--input", source, "--kind", "char", "--output", out])
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def cli_call(capsys):
    return lambda entry, argv: call(entry, argv, capsys)


def test_char_tokenizer_is_the_seeds_stoi_on_all_of_tiny_shakespeare_and_metas_tokenizer_agrees(tmp_path, cli_call):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    path = char_tokenizer_file(tmp_path, text, cli_call)
    chars = sorted(set(text))  # the seeds' vocabulary, built by hand
    stoi = {c: i for i, c in enumerate(chars)}
    ours = load_tokenizer(path)
    assert ours.n_words == len(chars) + 256 == 65 + 256
    ids = ours.encode(text, bos=False)
    assert ids == [stoi[c] for c in text]
    assert ours.decode(ids) == text
    meta = MetaTokenizer(path)  # Meta's reference reads the file unchanged, specials after the last rank
    assert meta.n_words == ours.n_words and meta.special_tokens["<|begin_of_text|>"] == ours.bos_id == 65
    assert meta.encode(text[:20000], bos=True, eos=False) == [ours.bos_id] + ids[:20000]
    assert meta.decode(ids[:5000]) == text[:5000]


def test_characters_of_two_three_and_four_bytes_round_trip(tmp_path, cli_call):
    text = "héllo — wörld 😀 ∑ x\n"
    tokenizer = load_tokenizer(char_tokenizer_file(tmp_path, text, cli_call))
    ids = tokenizer.encode(text, bos=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert sorted(tokenizer.alphabet) == sorted(set(text))


def test_a_character_outside_the_alphabet_is_one_sentence_never_a_wrong_id(tmp_path, cli_call):
    tokenizer = load_tokenizer(char_tokenizer_file(tmp_path, "abc ab\n", cli_call))
    with pytest.raises(UserError, match=r"'z' \(U\+007A, character 4\).*5 characters do not include") as err:
        tokenizer.encode("ab z")
    assert "\n" not in str(err.value)
    assert tokenizer.encode("<|begin_of_text|>ab", bos=False, allowed_special="all") == [tokenizer.bos_id, 2, 3]  # "\n" " " a b c
    with pytest.raises(UserError, match="'<'"):  # not allowed: the special token's text is plain text here
        tokenizer.encode("<|begin_of_text|>ab", bos=False)


def test_train_tokenizer_flags(tmp_path, cli_call):
    source = tmp_path / "t.txt"
    source.write_text("abc")
    result = cli_call(train_tokenizer.main, ["--input", source, "--kind", "char", "--vocab-size", 300, "--output",
                                              tmp_path / "x.model"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "drop --vocab-size" in result.stderr
    result = cli_call(train_tokenizer.main, ["--input", source, "--output", tmp_path / "x.model"])
    assert result.returncode == 2 and "--vocab-size is required" in result.stderr
    assert not (tmp_path / "x.model").exists()


@pytest.mark.parametrize("tokenizer, message", [
    ({"kind": "words"}, "tokenizer.kind 'words'"), ({"kind": "char", "bpe_ranks": 300}, "drop bpe_ranks"),
    ("char", "must be an object"), ({"bpe_ranks": 300, "merges": 4}, "must be an object")])
def test_recipe_tokenizer_field_is_checked(tokenizer, message):
    with pytest.raises(UserError, match=message):
        recipe_from_raw({**TINY, "tokenizer": tokenizer}, Path("r.json"), SHAKESPEARE)


def test_recipe_char_tokenizer_takes_its_size_from_the_corpus():
    recipe = recipe_from_raw({**TINY, "tokenizer": {"kind": "char"}}, Path("r.json"), SHAKESPEARE)
    assert recipe.tokenizer_kind == "char" and recipe.params.vocab_size == 65 + 256


def test_layer_norm_is_torchs_and_model_py_is_untouched():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    weight = torch.rand(64, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x, weight, 1e-5), F.layer_norm(x, (64,), weight, None, 1e-5))
    linked = forward_with(None, VARIANTS["layernorm"].swap)
    assert linked is not model.forward and linked.__code__ is model.forward.__code__
    assert linked.__globals__["rms_norm"] is layer_norm and model.rms_norm.__name__ == "rms_norm"


def tiny_model(variant="llama3", n_layers=1):
    params = params_from_dict({**TINY["model"], "n_layers": n_layers, "vocab_size": 50})
    shapes = VARIANTS[variant].weight_shapes(params)
    weights = init_weights(params, TrainSettings(init_std=0.5), torch.Generator().manual_seed(0), shapes)
    return {k: w.detach().double() for k, w in weights.items()}, params


def last_logits(forward, weights, params, ids):
    return forward(weights, params, torch.tensor([ids]))[0][0, -1]


def test_without_rope_one_block_cannot_tell_the_order_of_the_earlier_tokens():
    weights, params = tiny_model()
    a, b = [1, 7, 3, 9, 4], [9, 3, 1, 7, 4]  # the same tokens, the last one in place
    no_rope = forward_with(None, VARIANTS["no_rope"].swap)
    torch.testing.assert_close(last_logits(no_rope, weights, params, a), last_logits(no_rope, weights, params, b))
    assert not torch.allclose(last_logits(model.forward, weights, params, a), last_logits(model.forward, weights, params, b))


def test_without_the_mask_a_token_sees_the_ones_after_it():
    weights, params = tiny_model()
    no_mask = forward_with(None, VARIANTS["no_mask"].swap)
    first = [no_mask(weights, params, torch.tensor([ids]))[0][0, 0] for ids in ([1, 2, 3], [1, 2, 8])]
    assert not torch.allclose(*first)
    causal = [model.forward(weights, params, torch.tensor([ids]))[0][0, 0] for ids in ([1, 2, 3], [1, 2, 8])]
    torch.testing.assert_close(*causal)


def test_relu_mlp_has_swiglus_parameter_count_and_computes_relu():
    params = params_from_dict({**TINY["model"], "vocab_size": 50})
    count = lambda shapes: sum(torch.Size(s).numel() for s in shapes.values())  # noqa: E731
    assert count(relu_shapes(params)) == count(params.weight_shapes()) == params.parameter_count()
    weights, params = tiny_model("relu_mlp")
    x = torch.randn(2, 3, params.dim, dtype=torch.float64)
    w1, w2 = weights["layers.0.feed_forward.w1.weight"], weights["layers.0.feed_forward.w2.weight"]
    torch.testing.assert_close(relu_feed_forward(x, weights, 0), torch.relu(x @ w1.T) @ w2.T)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    recipe = path.parent / "tiny.json"
    recipe.write_text(json.dumps(TINY))
    return path, recipe


@pytest.fixture(scope="module")
def tiny_lab(tiny_corpus, tmp_path_factory):
    corpus, recipe = tiny_corpus
    out = tmp_path_factory.mktemp("lab") / "lab"
    return out, ladder.run_lab(out, recipe, corpus=corpus, show_progress=False)


def test_the_ladder_trains_every_variant_and_writes_json_plot_and_table(tiny_lab):
    out, lab = tiny_lab
    assert [r["name"] for r in lab["variants"]] == list(VARIANTS)
    assert json.loads((out / "lab.json").read_text()) == lab
    assert (out / "lab.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "lab.md").read_text()
    by_name = {r["name"]: r for r in lab["variants"]}
    for r in lab["variants"]:
        assert f"| {r['label']} | {r['val_nats_per_char']:.4f} |" in table and r["final_is_whole_split"]
        assert r["val_curve"][-1][0] == TINY["train"]["steps"] and r["sample"].startswith("ROMEO:\n")
    # kv bytes per token: 2 (k and v) x layers x kv heads x head_dim 8 x 2 bytes (bf16)
    assert by_name["llama3"]["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 8 * 2
    assert by_name["mha"]["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 8 * 2
    assert by_name["one_block"]["kv_cache_bytes_per_token"] == 2 * 1 * 2 * 8 * 2
    assert by_name["relu_mlp"]["parameters"] == by_name["llama3"]["parameters"]
    assert by_name["char"]["vocab_size"] == len(set(SHAKESPEARE.read_text(encoding="utf-8")[:30000])) + 256
    # nats per character: the char model's per-token loss is its per-character loss
    char = by_name["char"]
    assert char["val_nats_per_token"] == pytest.approx(char["val_nats_per_char"])
    llama3 = by_name["llama3"]
    assert llama3["val_nats_per_token"] / llama3["val_nats_per_char"] == pytest.approx(llama3["val_chars_per_token"])


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others(tiny_lab, tiny_corpus, tmp_path):
    corpus, recipe = tiny_corpus
    _, lab = tiny_lab
    again = ladder.run_lab(tmp_path / "again", recipe, names=["llama3", "no_rope"], corpus=corpus, show_progress=False)
    first = {r["name"]: r for r in lab["variants"]}
    for r in again["variants"]:
        assert r["val_curve"] == first[r["name"]]["val_curve"] and r["sample"] == first[r["name"]]["sample"]
    other = ladder.run_lab(tmp_path / "other", recipe, names=["llama3"], seed=7, corpus=corpus, show_progress=False)
    assert other["variants"][0]["val_curve"] != first["llama3"]["val_curve"]


def test_a_finished_lab_is_read_back_and_another_lab_is_refused(tiny_lab, tiny_corpus, capsys):
    corpus, recipe = tiny_corpus
    out, lab = tiny_lab
    before = (out / "runs" / "llama3" / "train_state.pt").stat().st_mtime_ns
    again = ladder.run_lab(out, recipe, corpus=corpus, show_progress=False)
    assert [r["val_curve"] for r in again["variants"]] == [r["val_curve"] for r in lab["variants"]]
    assert (out / "runs" / "llama3" / "train_state.pt").stat().st_mtime_ns == before  # not trained again
    result = call(lab_main, ["--config", recipe, "--corpus", corpus, "--out", out, "--steps", 2], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "other settings" in result.stderr


@pytest.mark.parametrize("argv, flag", [
    (["--variants", "llama3,bogus"], "--variants bogus"), (["--steps", "0"], "--steps"),
    (["--seed", "-1"], "--seed"), (["--threads", "x"], "--threads"), (["--quick", "--frobnicate"], "--frobnicate")])
def test_bad_flags_are_one_sentence_and_exit_2(argv, flag, tmp_path, capsys):
    result = call(lab_main, [*argv, "--out", tmp_path / "lab"], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and flag in result.stderr, result.stderr
    assert not (tmp_path / "lab").exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys, tiny_corpus):
    corpus, recipe = tiny_corpus
    (tmp_path / "f").write_text("x")
    result = call(lab_main, ["--config", recipe, "--corpus", corpus, "--out", tmp_path / "f"], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--out" in result.stderr
    assert (tmp_path / "f").read_text() == "x"


def test_the_char_model_runs_in_run_py_chat_inspect_compare_and_score(tiny_lab, tmp_path, capsys):
    out, _ = tiny_lab
    ckpt = out / "runs" / "char"
    result = call(python_m, ["run", "ROMEO:", "--ckpt-dir", ckpt, "--max-new-tokens", 5, "--temperature", 0], capsys)
    assert result.returncode == 0, result.stderr
    result = call(python_m, ["run", "café", "--ckpt-dir", ckpt, "--max-new-tokens", 5], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "'é'" in result.stderr
    result = call(python_m, ["run", "--ckpt-dir", ckpt, "--chat", "--message", "Hi there", "--max-new-tokens", 4],
                  capsys)
    assert result.returncode == 0, result.stderr
    result = call(python_m, ["inspect", "ROMEO", "--ckpt-dir", ckpt, "--out", tmp_path / "views", "--layers", "1"],
                  capsys)
    assert result.returncode == 0, result.stderr
    result = call(python_m, ["compare", "ROMEO:", "--ckpt-dir", ckpt, "--json"], capsys)
    assert result.returncode == 0 and json.loads(result.stdout)["ok"], result.stderr  # Meta's reference model agrees
    (tmp_path / "t.txt").write_text("ROMEO: and JULIET, too.\n")
    result = call(python_m, ["score", tmp_path / "t.txt", "--ckpt-dir", ckpt, "--json"], capsys)
    assert result.returncode == 0, result.stderr


def test_variant_checkpoints_are_not_exported_as_llama3(tiny_lab):
    out, _ = tiny_lab
    for name, variant in VARIANTS.items():
        assert (out / "runs" / name / "consolidated.00.pth").exists() == variant.is_llama3, name


@pytest.mark.slow
def test_quick_lab_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama3_raw.lab", "--quick", "--out", str(tmp_path / "q"),
                             "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lab = json.loads((tmp_path / "q" / "lab.json").read_text())
    by_name = {r["name"]: r for r in lab["variants"]}
    assert set(by_name) == set(VARIANTS)
    assert all(r["val_nats_per_char"] < 4.17 for r in lab["variants"])  # log(65): better than uniform characters
    assert by_name["no_mask"]["val_nats_per_char"] < by_name["llama3"]["val_nats_per_char"]  # too good to be true


@pytest.mark.slow
def test_claims_quick(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llama3_raw.lab.claims", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims["kv_bytes"]["gqa_bytes_per_token"] == 2 * 32 * 8 * 128 * 2  # 8B: layers, kv heads, head_dim, bf16
    assert claims["kv_bytes"]["mha_bytes_per_token"] == 4 * claims["kv_bytes"]["gqa_bytes_per_token"]
    # the shipped model's products for one token, by hand: per layer wq, wo (256 x 256), wk, wv (128 x 256), three
    # SwiGLU matrices (704 x 256) and q.k, p.v over 8 heads of 32 at one position; then output (1280 x 256)
    by_hand = 6 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 704 * 256 + 2 * 8 * 32) + 1280 * 256
    first = next(r for r in claims["kv_cache"] if r["n"] == 1)
    assert first["mults_without_cache"] == first["mults_with_cache"] == by_hand
    third = next(r for r in claims["kv_cache"] if r["n"] == 3)
    assert 0.6 < third["saved"] < 0.67  # projections of 1 position instead of 3, attention a little more
    assert claims["rope_reordered"]["no_rope"]["layer0_attention_max_diff"] < 1e-5
    assert claims["rope_reordered"]["rope"]["layer0_attention_max_diff"] > 1e-3


def test_a_missing_corpus_is_refused_before_out_is_written(tmp_path, capsys, tiny_corpus):
    _, recipe = tiny_corpus
    result = call(lab_main, ["--config", recipe, "--corpus", tmp_path / "none.txt", "--out", tmp_path / "lab"], capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "none.txt" in result.stderr
    assert not (tmp_path / "lab").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_lab_in_one_line_saved_and_a_second_lab_is_refused_meanwhile(signum, code, tmp_path,
                                                                                       tiny_corpus):
    """Ctrl-C and SIGTERM (a scheduler's pre-emption) both finish the step, save and exit 128 + the signal;
    while the first lab runs, a second one on the same --out is refused at once (the OS lock, issue 31)."""
    corpus, _ = tiny_corpus
    recipe = tmp_path / "long.json"
    recipe.write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 100000, "eval_interval": 50000}}))
    command = [sys.executable, "-m", "llama3_raw.lab", "--config", str(recipe), "--corpus", str(corpus), "--out",
               str(tmp_path / "lab"), "--variants", "llama3", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "lab" / "runs" / "llama3" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)  # a few log lines: the steps are running
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1 and "--out" in second.stderr and str(process.pid) in second.stderr
    os.kill(process.pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("lab interrupted in llama3 at step ")
    assert (tmp_path / "lab" / "runs" / "llama3" / "train_state.pt").is_file()  # resumable
    assert not (tmp_path / "lab" / "lab.json").exists()  # no results from half a ladder
