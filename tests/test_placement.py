"""checkpoints/placement.py: the weights copied into anonymous memory in 2 MiB pages, unchanged in every other way.

What could go wrong, and is checked here: a value, dtype, shape or stride changed (int4 scales are a transposed
view that the kernels read in that order); tied weights untied (two copies); anonymous source memory zeroed by
the file-page hand-back; the checkpoint's file pages kept as well as the copy (a second copy of the weights);
the pages not huge after all; the same logits not coming out.
"""

import re

import pytest
import torch

from helpers import RSS_SHAPE, TINY_GQA, probe_rss, write_random_checkpoint
from llama3_raw.checkpoints import load_checkpoint, load_model, open_folder, placement
from llama3_raw.checkpoints.placement import file_backed_ranges, huge_pages_available, in_huge_pages
from llama3_raw.model import forward
from llama3_raw.quantize import Int4Weight, Int8Weight, groups_by_row, quantize_int4, quantize_weights

needs_huge_pages = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages to ask for here")


def mapping_of(address: int) -> dict[str, int]:
    """The /proc/self/smaps fields (kB) of the mapping that holds `address`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                if inside:
                    break
                inside = int(head[1], 16) <= address < int(head[2], 16)
            elif inside and (field := re.match(r"^(\w+):\s+(\d+) kB", line)):
                fields[field[1]] = int(field[2])
    return fields


def assert_same_weights(before: dict, after: dict, staying: tuple[str, ...] = ()) -> None:
    """Equal in every way; moved, except the keys `staying`, which are the very same tensors."""
    assert list(before) == list(after)
    for key, old in before.items():
        new = after[key]
        assert type(new) is type(old), key
        for old_t, new_t in zip(placement.tensors_of(old), placement.tensors_of(new)):
            assert (new_t.dtype, new_t.shape, new_t.stride()) == (old_t.dtype, old_t.shape, old_t.stride()), key
            assert torch.equal(new_t, old_t), key
            assert (new_t.data_ptr() == old_t.data_ptr()) == (key in staying), key


@needs_huge_pages
def test_plain_and_quantized_weights_come_out_equal_and_tied_ones_stay_tied():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(300, 64, generator=generator).to(torch.bfloat16)
    weights = {"tok_embeddings.weight": embeddings, "norm.weight": torch.ones(64, dtype=torch.bfloat16),
               "layers.0.attention.wq.weight": torch.randn(64, 64, generator=generator).to(torch.bfloat16),
               "output.weight": embeddings}
    int8 = quantize_weights(weights, torch.bfloat16, "int8")
    int4 = dict(weights)
    for key in ("layers.0.attention.wq.weight", "output.weight"):  # in the plain layout, whether or not the kernels
        q = quantize_int4(weights[key], 32)                           # are built here (quantize_weights would pick)
        int4[key] = Int4Weight(q.packed, groups_by_row(q.scales_and_zeros), q.in_features)
    assert not int4["output.weight"].scales_and_zeros.is_contiguous()  # a transposed view: kept so, strides and all
    for original in (weights, int8, int4):
        placed = in_huge_pages(dict(original))
        tied = original is weights  # quantizing gives the output matrix its own copy
        # The embeddings, read a row a step, move only as the output matrix: read whole every step.
        assert_same_weights(original, placed, staying=() if tied else ("tok_embeddings.weight",))
        assert (placed["tok_embeddings.weight"] is placed["output.weight"]) == tied
        assert isinstance(placed["layers.0.attention.wq.weight"], (torch.Tensor, Int8Weight, Int4Weight))


@needs_huge_pages
def test_a_column_slice_is_copied_whole_and_contiguous():
    full = torch.arange(64 * 128, dtype=torch.float32).view(64, 128)
    half = full[:, 64:]  # a rank's column cut: its elements do not fill one block
    placed = in_huge_pages({"w": half})["w"]
    assert torch.equal(placed, half) and placed.is_contiguous()


@needs_huge_pages
def test_anonymous_sources_keep_their_values():
    """Only a file's pages are handed back: MADV_DONTNEED on anonymous memory would zero what a caller still holds."""
    held = torch.randn(1 << 20)  # 4 MiB, from malloc: anonymous
    expected = held.clone()
    in_huge_pages({"w": held})
    assert torch.equal(held, expected)


@needs_huge_pages
def test_the_copy_is_in_2mib_pages_and_not_a_file():
    weights = {f"layers.{i}.w": torch.full((1 << 20,), float(i)) for i in range(4)}  # 16 MiB
    placed = in_huge_pages(weights)
    address = placed["layers.0.w"].data_ptr()
    assert not any(lo <= address < hi for lo, hi in file_backed_ranges())
    assert address % (2 << 20) == 0  # the first tensor starts on a huge page
    assert mapping_of(address)["AnonHugePages"] >= 8 << 10, mapping_of(address)
    assert weights == {}  # consumed, so that each source could go as soon as it was copied


@needs_huge_pages
def test_an_anonymous_source_is_gone_once_it_is_copied(monkeypatch):
    """Weights converted at load (dequantized, quantized) are anonymous memory: each must be freed right after its
    copy, or the process holds both copies at the peak (once: every source, until the last was copied)."""
    import weakref

    sources = {f"layers.{i}.w": torch.full((1 << 18,), float(i)) for i in range(4)}
    alive = {key: weakref.ref(t) for key, t in sources.items()}
    seen = []
    copy_into = placement.copy_into

    def watching(memory, offset, t):
        seen.append([key for key, ref in alive.items() if ref() is not None])
        return copy_into(memory, offset, t)

    monkeypatch.setattr(placement, "copy_into", watching)
    placed = in_huge_pages(sources)  # `sources` is consumed: no reference but the function's own
    assert seen == [list(alive)[i:] for i in range(4)]  # when the i-th is copied, the ones before it are gone
    assert [float(placed[key][0]) for key in alive] == [0.0, 1.0, 2.0, 3.0]


def test_nothing_moves_where_huge_pages_are_off(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(placement, "THP_SETTING", setting)
    weights = {"w": torch.ones(3)}
    assert in_huge_pages(weights) is weights
    monkeypatch.setattr(placement, "THP_SETTING", tmp_path / "absent")  # not Linux, or a kernel without THP
    assert in_huge_pages(weights) is weights
    meta = {"w": torch.ones(3, device="meta")}
    assert in_huge_pages(meta) is meta


@needs_huge_pages
def test_load_model_places_the_weights_and_the_logits_do_not_change(tmp_path):
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", TINY_GQA, seed=3)
    folder = open_folder(ckpt_dir)
    model = load_model(folder, dtype="bfloat16", show_progress=False)
    file_ranges = file_backed_ranges()
    in_file = {key for key, w in model.weights.items() if any(lo <= w.data_ptr() < hi for lo, hi in file_ranges)}
    assert in_file == {"tok_embeddings.weight"}  # this checkpoint has its own output matrix: the table stays mapped
    mapped = load_checkpoint(ckpt_dir, show_progress=False).weights  # the same weights, memory-mapped from the file
    tokens = torch.tensor([[128000, 5, 6, 7, 8]])
    with torch.inference_mode():
        placed_logits, _ = forward(model.weights, model.params, tokens)
        mapped_logits, _ = forward(mapped, model.params, tokens)
    assert torch.equal(placed_logits, mapped_logits)


@needs_huge_pages
def test_a_checkpoint_mapped_in_2mib_pages_already_stays_mapped(tmp_path, monkeypatch):
    """Whether the kernel maps a file with 2 MiB pages depends on its page cache; both answers are taken here."""
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", TINY_GQA, seed=4)
    for already in (True, False):
        monkeypatch.setattr(placement, "mapped_in_huge_pages", lambda tensors: already)
        weights = load_checkpoint(ckpt_dir, show_progress=False).weights
        weights["layers.0.made_at_load"] = torch.ones(4096)  # anonymous: moves either way
        before = dict(weights)
        placed = in_huge_pages(weights)
        file_ranges = file_backed_ranges()
        in_file = {key for key, w in placed.items() if any(lo <= w.data_ptr() < hi for lo, hi in file_ranges)}
        expected = set(before) - {"layers.0.made_at_load"} if already else {"tok_embeddings.weight"}
        assert in_file == expected, already
        assert all(torch.equal(placed[key], before[key]) for key in before)


def test_mapped_in_huge_pages_answers_from_what_the_kernel_mapped(monkeypatch):
    """The check reads FilePmdMapped before and after mapping one page of every 2 MiB: it says yes only when that
    grew by about the tensors' size. (The kernel's own answer for a real file depends on its page cache.)"""
    t = torch.zeros(8 << 20, dtype=torch.uint8)
    readings = iter([0, 8 << 20, 0, 2 << 20, 0, 0])
    monkeypatch.setattr(placement, "file_pmd_mapped_bytes", lambda: next(readings))
    assert placement.mapped_in_huge_pages([t]) is True
    assert placement.mapped_in_huge_pages([t]) is False
    assert placement.mapped_in_huge_pages([]) is False


LOAD_PLACE_AND_GENERATE = """
from llama3_raw.checkpoints import load_checkpoint
from llama3_raw.checkpoints.placement import in_huge_pages
from llama3_raw.generate import generate
ckpt = load_checkpoint(sys.argv[1], show_progress=False)
weights = in_huge_pages(dict(ckpt.weights))  # ckpt still holds every mapped tensor
tokens = list(generate(weights, ckpt.params, [128000, 5, 6, 7], 4, stop_ids=()))
"""


@pytest.mark.slow  # a memory probe on a checkpoint of a few hundred MB, in a fresh interpreter
@needs_huge_pages
def test_placing_holds_one_copy_of_the_weights(tmp_path):
    """The checkpoint object still holds every memory-mapped tensor, so only the hand-back keeps the file's pages
    out of the process: without it, the process would end up with the file's pages and the copy."""
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", RSS_SHAPE, seed=5)
    file_bytes = (ckpt_dir / "consolidated.00.pth").stat().st_size
    assert file_bytes > 200e6
    rss = probe_rss(LOAD_PLACE_AND_GENERATE, ckpt_dir)
    assert rss["tokens"] == 4
    # The copy (file_bytes, rounded up to pages per tensor), the tiny cache and activations, part of the logits;
    # at the peak also the largest tensor's file pages, which go right after it is copied.
    grown, peak = rss["after"] - rss["before"], rss["peak"] - rss["before"]
    assert grown <= 1.1 * file_bytes + 60e6, f"grew by {grown / 1e6:.0f} MB for a {file_bytes / 1e6:.0f} MB file"
    assert peak <= 1.1 * file_bytes + 60e6 + 50e6 + 128256 * 1024 * 2  # the largest: the embeddings


LOAD_QUANTIZED_AND_GENERATE = """
from llama3_raw.checkpoints import load_model, open_folder
from llama3_raw.generate import generate
model = load_model(open_folder(sys.argv[1]), dtype="bfloat16", quantize="int8", show_progress=False, new_tokens=4)
tokens = list(generate(model.weights, model.params, [128000, 5, 6, 7], 4, stop_ids=()))
"""


@pytest.mark.slow  # a memory probe on a checkpoint of a few hundred MB, in a fresh interpreter
def test_quantizing_at_load_keeps_the_int8_copy_and_not_the_files_pages(tmp_path):
    """Each bf16 matrix of the file is read once, to quantize it; then its pages go (heap.hand_back_converted), so
    the process ends with the int8 copy, the embedding rows it looked up and little else, not the file as well."""
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", RSS_SHAPE, seed=5)
    file_bytes = (ckpt_dir / "consolidated.00.pth").stat().st_size
    matrix_bytes = file_bytes - RSS_SHAPE["vocab_size"] * RSS_SHAPE["dim"] * 2  # all but the (looked-up) embeddings
    assert matrix_bytes > 300e6
    rss = probe_rss(LOAD_QUANTIZED_AND_GENERATE, ckpt_dir)
    grown = rss["after"] - rss["before"]
    # int8: half the bf16 bytes, plus ~100 MB of logits, cache and heap (measured: 282 MB for 372 MB of matrices;
    # 651 MB when the pages stayed)
    assert rss["tokens"] == 4 and grown <= 0.5 * matrix_bytes + 120e6, \
        f"grew by {grown / 1e6:.0f} MB for {matrix_bytes / 1e6:.0f} MB of bf16 matrices"


@needs_huge_pages
def test_without_room_for_the_copy_the_weights_stay_mapped(tmp_path, monkeypatch):
    """A mapped file can be paged in and out under memory pressure; an anonymous copy could not. So the copy is
    made only where it leaves SPARE_BYTES available: the file's bytes count, anonymous sources only one at a time."""
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", TINY_GQA, seed=6)
    mapped = load_checkpoint(ckpt_dir, show_progress=False).weights
    file_bytes = sum(w.nbytes for key, w in mapped.items() if key != "tok_embeddings.weight")
    monkeypatch.setattr(placement, "available_memory_bytes", lambda: placement.SPARE_BYTES + file_bytes // 2)
    assert in_huge_pages(mapped) is mapped
    anonymous = {f"layers.{i}.w": torch.ones(1 << 20) for i in range(8)}  # 32 MiB made at load, 4 MiB the largest
    monkeypatch.setattr(placement, "available_memory_bytes", lambda: placement.SPARE_BYTES + (4 << 20) - 1)
    assert in_huge_pages(anonymous) is anonymous
    monkeypatch.setattr(placement, "available_memory_bytes", lambda: placement.SPARE_BYTES + (4 << 20))
    placed = in_huge_pages(dict(anonymous))
    assert all(placed[k].data_ptr() != anonymous[k].data_ptr() for k in anonymous)


def test_the_copy_is_made_only_for_a_run_long_enough_to_pay_it_back():
    assert placement.copy_pays_back(None)  # a chat: as many tokens as the session brings
    assert placement.copy_pays_back(placement.PAYS_BACK_TOKENS)
    assert not placement.copy_pays_back(placement.PAYS_BACK_TOKENS - 1)
    assert not placement.copy_pays_back(1)  # a one-token run (time to first token): the file's own pages


@needs_huge_pages
def test_a_short_run_computes_from_the_files_pages_and_a_long_one_from_the_copy(tmp_path):
    ckpt_dir = write_random_checkpoint(tmp_path / "ckpt", TINY_GQA, seed=3)
    folder = open_folder(ckpt_dir)
    short = load_model(folder, dtype="bfloat16", show_progress=False, new_tokens=32)
    long = load_model(folder, dtype="bfloat16", show_progress=False, new_tokens=placement.PAYS_BACK_TOKENS)
    file_ranges = file_backed_ranges()
    in_file = lambda weights: {k for k, w in weights.items() if any(lo <= w.data_ptr() < hi for lo, hi in file_ranges)}  # noqa: E731
    assert in_file(short.weights) == set(short.weights)
    assert in_file(long.weights) == {"tok_embeddings.weight"}
    tokens = torch.tensor([[128000, 5, 6, 7, 8]])
    with torch.inference_mode():
        assert torch.equal(forward(short.weights, short.params, tokens)[0], forward(long.weights, long.params, tokens)[0])
