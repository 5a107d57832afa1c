"""Memory that loading no longer needs goes back to the system.

Converting weights at load (a GGUF's blocks dequantized, matrices quantized, copies into 2 MiB pages) leaves
two kinds of memory behind that the process would otherwise keep for its whole run:
- the C heap's freed temporaries and sources of a few MB each: glibc's malloc keeps them for the next
  allocation, and loading makes no more of that kind (the 1B shape's Q4_0 file: 1.0 GB of 2.4 GB resident
  after loading, and 0.4 GB more at the peak);
- the file's pages under a tensor that has been converted: the file's own bytes, read again if touched, yet
  counted in the process's memory while the file stays mapped (the embedding table, a view of the file,
  keeps it mapped for the whole run).
"""

import ctypes
import mmap

import torch

from ..quantize import Int4Weight, Int8Weight

LIBC = ctypes.CDLL(None, use_errno=True)
TRIM = getattr(LIBC, "malloc_trim", None)  # glibc's; elsewhere (macOS, musl) nothing is done


def return_freed_heap() -> None:
    """Give the C heap's free memory back to the system (malloc_trim(0); a millisecond or so)."""
    if TRIM is not None:
        TRIM(0)


def file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files (/proc/self/maps lines with an inode; none where
    there is no /proc: nothing is then handed back)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def own_span(t: torch.Tensor) -> tuple[int, int]:
    """Addresses from `t`'s first element to just past its last (`t` may be a view: only its own span)."""
    start = t.data_ptr()
    return start, start + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def is_file_backed(t: torch.Tensor, file_ranges: list[tuple[int, int]]) -> bool:
    start, end = own_span(t)
    return t.numel() > 0 and any(lo <= start and end <= hi for lo, hi in file_ranges)


def hand_back_file_pages(t: torch.Tensor, file_ranges: list[tuple[int, int]]) -> None:
    """Unmap the whole pages of `t`'s memory from this process if they are a file's pages (read again from
    the file if touched again). Only file pages: MADV_DONTNEED on anonymous memory would zero it."""
    if not is_file_backed(t, file_ranges):
        return
    start, end = own_span(t)
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def hand_back_converted(source, converted, file_ranges: list[tuple[int, int]]) -> None:
    """`source` (a tensor) has been converted into `converted`, a new tensor or quantized weight: its file pages go."""
    if isinstance(source, torch.Tensor) and all(t.data_ptr() != source.data_ptr() for t in tensors_of(converted)):
        hand_back_file_pages(source, file_ranges)


def tensors_of(weight) -> list[torch.Tensor]:
    """The tensors a weight is made of: itself, or a quantized matrix's values and scales."""
    if isinstance(weight, Int8Weight):
        return [weight.values, weight.scales]
    if isinstance(weight, Int4Weight):
        return [weight.packed, weight.scales_and_zeros]
    return [weight]
