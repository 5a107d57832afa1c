"""Where the weights live on the CPU: anonymous memory advised into 2 MiB pages.

A decode step reads every weight once, so every 4 KiB page of weights costs a TLB miss, and in a virtual
machine a miss walks two sets of page tables. Measured on the 1B shape (bf16, 2 threads, alternating in
one process): a decode step took 59 ms with the weights in 4 KiB pages and 50 ms in 2 MiB pages.

A memory-mapped checkpoint is in 2 MiB pages only by luck: the kernel maps a file with them only where
its page cache happens to hold the file in 2 MiB folios. A file read fresh from disk mostly is; one
written by torch.save and still cached was not at all (checked with /proc/self/smaps, FilePmdMapped).
Tensors made while loading (another dtype, quantized at load) come from malloc, in 4 KiB pages unless
the system's transparent huge pages are set to "always" (the common default is "madvise").

So on Linux the loader copies the weights into one anonymous mapping advised MADV_HUGEPAGE, tensor by
tensor. It never holds two copies: a tensor that was the checkpoint file's pages has them handed back
(MADV_DONTNEED: they stay in the page cache, out of this process) as soon as it is copied; one that was
anonymous is freed when its last reference goes. The copy costs load time (1B bf16, 2.47 GB: 1.1 to 3.2 s
more, most of it the kernel finding and zeroing 2 MiB pages), so a memory-mapped checkpoint that the kernel
maps with 2 MiB pages already (checked by mapping one page of every 2 MiB) stays where it is. Where huge
pages are switched off ("never") or absent, or where the copy would not leave 2 GiB of memory available (a
mapped file can be paged in and out under memory pressure; an anonymous copy could not), everything stays.
"""

import ctypes
import mmap
from pathlib import Path

import torch
from tqdm import tqdm

from ..quantize import Int4Weight, Int8Weight
from .defaults import available_memory_bytes
from .heap import file_backed_ranges, hand_back_file_pages, is_file_backed, own_span, return_freed_heap, tensors_of

HUGE_PAGE = 2 << 20
SLOT_ALIGN = 4096  # every tensor starts on its own page: the kernels' rows are then 64-byte aligned too
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROGRESS_MIN_BYTES = 256 << 20
SPARE_BYTES = 2 << 30  # left over after the copy, for the cache, activations and everything else
# The copy pays back only over a long run. 1B bf16 on an AMD EPYC VM (2026-11): 1.1 to 3.2 s for the copy, 9 ms
# a token less (59 -> 50 ms): back after 120 to 360 tokens. On an Intel Xeon VM (2026-12-06): 0.74 s, and decode
# alike from either kind of page (103-108 ms a step, alternating), so never; there the 8B copy (~6 s) put the time
# to first token of a one-token run at 4x llama.cpp's, which maps its file and copies nothing.
PAYS_BACK_TOKENS = 256
ROW_READ_KEYS = ("tok_embeddings.weight",)  # a decode step reads one row: no page walks to save


def copy_pays_back(new_tokens: int | None) -> bool:
    """Whether a run that generates `new_tokens` (None: as many as a session brings, a chat) is long enough for
    the copy into 2 MiB pages to pay back its time (PAYS_BACK_TOKENS); a shorter one computes from the file's pages."""
    return new_tokens is None or new_tokens >= PAYS_BACK_TOKENS


def huge_pages_available() -> bool:
    """Linux with transparent huge pages that MADV_HUGEPAGE can ask for ("always" or "madvise")."""
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in setting


def with_tensors(weight, tensors: list[torch.Tensor]):
    """`weight` rebuilt from new tensors in the order tensors_of gives them."""
    if isinstance(weight, Int8Weight):
        return Int8Weight(*tensors)
    if isinstance(weight, Int4Weight):
        return Int4Weight(*tensors, weight.in_features, weight.layout)
    return tensors[0]


def dense_order(t: torch.Tensor) -> list[int] | None:
    """The order of dimensions in which `t` is contiguous (a transposed matrix: (1, 0)), or None when its
    elements do not fill one block of memory (a column slice): that one is copied contiguous instead."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def slot_bytes(t: torch.Tensor) -> int:
    return -(-t.nbytes // SLOT_ALIGN) * SLOT_ALIGN


def file_pmd_mapped_bytes() -> int:
    """Bytes of files this process maps with 2 MiB pages (/proc/self/smaps_rollup; 0 where it is not kept)."""
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("FilePmdMapped:"):
                return int(line.split()[1]) * 1024
    return 0


def mapped_in_huge_pages(tensors: list[torch.Tensor]) -> bool:
    """Whether the kernel maps these memory-mapped tensors with 2 MiB pages: read one byte in every 2 MiB of
    each, which maps the page there, and see FilePmdMapped grow by about their size. It does where the page
    cache holds the file in 2 MiB folios (a copy would gain nothing then, and cost a second or two a GB)."""
    before, total = file_pmd_mapped_bytes(), 0
    for t in tensors:
        start, end = own_span(t)
        total += end - start
        for address in range(start, end, HUGE_PAGE):
            ctypes.c_char.from_address(address).value  # noqa: B018 -- the read is the point: it maps the page
    return total > 0 and file_pmd_mapped_bytes() - before >= 0.9 * total


def in_huge_pages(weights: dict, show_progress: bool = False) -> dict:
    """The same weights (same keys, values, dtypes, strides; tied tensors still tied) in one anonymous
    mapping advised into 2 MiB pages; `weights` unchanged where that is unavailable or not on the CPU.

    Stay where they are: the embedding table unless it is also the output matrix (a step reads one row of it),
    and a memory-mapped checkpoint's tensors that the kernel maps with 2 MiB pages already.
    Consumes `weights`: its entries are removed as they are copied, so that each source can go at once.
    """
    if not huge_pages_available() or any(t.device.type != "cpu" for w in weights.values() for t in tensors_of(w)):
        return weights
    file_ranges = file_backed_ranges()
    staying = {key for key in ROW_READ_KEYS if key in weights and weights[key] is not weights.get("output.weight")}
    mapped = [key for key, w in weights.items()
              if key not in staying and all(is_file_backed(t, file_ranges) for t in tensors_of(w))]
    if mapped and mapped_in_huge_pages([t for key in mapped for t in tensors_of(weights[key])]):
        staying.update(mapped)  # the file's pages are 2 MiB already
    distinct = {id(w): w for key, w in weights.items() if key not in staying}
    sizes = [(slot_bytes(t), is_file_backed(t, file_ranges)) for w in distinct.values() for t in tensors_of(w)]
    del distinct  # it would keep every source alive until the end, where each is to go once it is copied
    total = sum(size for size, _ in sizes)
    # New memory: the copies of file pages (anonymous sources are freed as they are copied: one at a time)
    needed = sum(size for size, in_file in sizes if in_file) + max((size for size, _ in sizes), default=0)
    if not sizes or needed + SPARE_BYTES > available_memory_bytes():
        return weights  # (too little room: a mapped file can still be paged in and out, a copy could not)
    try:
        arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no address space for it, or no huge pages to ask for after all: they serve where they are
        return weights
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # holds the mapping for as long as a tensor uses it
    offset = -memory.data_ptr() % HUGE_PAGE
    placed: dict[int, object] = {}
    out = {}
    for key in tqdm(list(weights), desc="into 2 MiB pages", unit="tensor", leave=False,
                    disable=not show_progress or total < PROGRESS_MIN_BYTES):
        weight = weights.pop(key)
        if key in staying:
            out[key] = weight
            continue
        if id(weight) in placed:  # tied to a weight copied already
            out[key] = placed[id(weight)]
            continue
        copies = []
        for t in tensors_of(weight):
            copies.append(copy_into(memory, offset, t))
            offset += slot_bytes(t)
            hand_back_file_pages(t, file_ranges)
        out[key] = placed[id(weight)] = with_tensors(weight, copies)
        weight = t = None  # an anonymous source is freed now, into the C heap, which hands it on to the system
        return_freed_heap()
    return out


def copy_into(memory: torch.Tensor, offset: int, t: torch.Tensor) -> torch.Tensor:
    """`t` copied to memory[offset:], keeping its strides when its elements fill one block (see dense_order)."""
    order = dense_order(t) or list(range(t.dim()))
    shape_in_order = [t.shape[d] for d in order]
    block = memory[offset:offset + t.nbytes].view(t.dtype).view(shape_in_order)
    copy = block.permute([order.index(d) for d in range(t.dim())])  # back to t's own order of dimensions
    copy.copy_(t)
    return copy
