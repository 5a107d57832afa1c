"""The command line with the other checkpoint formats, batched prompts and chat: in this process (the `cli`
fixture), but for the chat read from a real standard input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import OFFICIAL_TOKENIZER, TINY_GQA, random_state_dict, write_checkpoint, write_sharded_checkpoint
from llama3_raw import load_tokenizer
from test_cli import REPO, tree_digest

PROMPTS = ["Hello", "the answer to the ultimate question of life, the universe, and everything is ", "1, 2, 3,"]


def test_prompts_file_json_lines_equal_single_runs(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = cli("--ckpt-dir", ckpt_dir, "--prompts-file", prompts_file, "--max-new-tokens", 5,
                     "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # JSON lines: one object per prompt
    assert [line["prompt"] for line in lines] == PROMPTS and [line["index"] for line in lines] == [0, 1, 2]
    for line in lines:
        alone = json.loads(cli(line["prompt"], "--ckpt-dir", ckpt_dir, "--max-new-tokens", 5,
                                   "--dtype", "float32", "--json").stdout)
        assert line["tokens"] == alone["tokens"] and line["text"] == alone["text"]
        assert line["prompt_tokens"] == alone["prompt_tokens"]


def test_plain_prompts_file_prints_each_prompt_and_its_completion_apart(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Hello\n\n1, 2, 3,\n")
    args = ("--ckpt-dir", ckpt_dir, "--prompts-file", prompts_file, "--max-new-tokens", 3)
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    texts = [json.loads(line)["text"] for line in cli(*args, "--json").stdout.splitlines()]  # greedy: the same
    assert result.stdout == (f"=== prompt 1 ===\nHello\n--- completion ---\n{texts[0]}\n\n"
                             f"=== prompt 2 ===\n1, 2, 3,\n--- completion ---\n{texts[1]}\n\n")
    assert "2 prompts in one batch" in result.stderr


def test_interactive_chat_through_stdin_keeps_the_conversation(gqa_checkpoint, tmp_path, cli):
    ckpt_dir, _, _ = gqa_checkpoint
    one_shot = json.loads(cli("--ckpt-dir", ckpt_dir, "--chat", "--message", "Hi there", "--max-new-tokens", 6,
                                  "--json").stdout)
    assert one_shot["messages"][-1] == {"role": "assistant", "content": one_shot["text"]}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "llama3_raw", "chat", "--ckpt-dir", str(ckpt_dir),
                             "--max-new-tokens", "6"], input="Hi there\n\nAnd then?\n/exit\nnever read\n",
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(one_shot["text"] + "\n")  # the same first reply as the one-shot form
    # The second reply continues the dialog: it is what a one-shot chat with the whole history gives, provided
    # the first reply's text encodes back to the ids the model chose (a history file holds text, not ids).
    assert load_tokenizer(OFFICIAL_TOKENIZER).encode(one_shot["text"], bos=False) == one_shot["tokens"]
    history = tmp_path / "history.json"
    history.write_text(json.dumps(one_shot["messages"] + [{"role": "user", "content": "And then?"}]))
    second = json.loads(cli("--ckpt-dir", ckpt_dir, "--chat", "--chat-file", history, "--max-new-tokens", 6,
                                "--json").stdout)
    assert result.stdout == one_shot["text"] + "\n" + second["text"] + "\n"


@pytest.fixture(scope="module")
def bad_formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_formats")
    state = random_state_dict(TINY_GQA, seed=9)
    gap = write_sharded_checkpoint(tmp / "gap", TINY_GQA, state, 2)
    (gap / "consolidated.01.pth").rename(gap / "consolidated.02.pth")
    uneven = write_sharded_checkpoint(tmp / "uneven", TINY_GQA, state, 2)
    shard = torch.load(uneven / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = shard["layers.0.feed_forward.w1.weight"][:-32].clone()
    torch.save(shard, uneven / "consolidated.01.pth")
    hf_index = tmp / "hf_index"
    hf_index.mkdir()
    (hf_index / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 128256, "intermediate_size": 192,
        "rms_norm_eps": 1e-5}))
    (hf_index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    not_llama = tmp / "not_llama"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    (not_llama / "model.safetensors").write_bytes(b"")
    good = write_checkpoint(tmp / "good", TINY_GQA, state)
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "broken_chat.json").write_text('[{"role": "user", "content": "hi"')
    return tmp, good


@pytest.mark.parametrize("case", ["shard gap", "uneven shards", "index to missing file", "not llama config",
                                  "empty prompts file", "chat file not json", "context too long", "message without chat"])
def test_bad_input_exits_2_with_one_sentence(bad_formats, case, cli):
    tmp, good = bad_formats
    args, fragment = {
        "shard gap": (["--ckpt-dir", tmp / "gap"], "consolidated.01.pth is missing"),
        "uneven shards": (["--ckpt-dir", tmp / "uneven"], "layers.0.feed_forward.w1.weight"),
        "index to missing file": (["--ckpt-dir", tmp / "hf_index", "--tokenizer", good / "tokenizer.model"],
                                  "lists model-00001-of-00002.safetensors"),
        "not llama config": (["--ckpt-dir", tmp / "not_llama"], "is not a Llama 3 config.json"),
        "empty prompts file": (["--ckpt-dir", good, "--prompts-file", tmp / "empty.txt"], "holds no prompts"),
        "chat file not json": (["--ckpt-dir", good, "--chat", "--chat-file", tmp / "broken_chat.json"],
                               "is not valid JSON"),
        "context too long": (["--ckpt-dir", good, "--context-len", "9000"], "--context-len 9000 exceeds"),
        "message without chat": (["--ckpt-dir", good, "--message", "hi"], "add --chat"),
    }[case]
    before = tree_digest(tmp)
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1, result.stderr
    assert result.stdout == ""
    assert tree_digest(tmp) == before  # nothing on disk changed
