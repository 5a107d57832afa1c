"""Memory that loading frees goes back to the system, not only to the C heap.

Converting weights at load (a GGUF's blocks dequantized, matrices quantized, copies into 2 MiB pages) frees
many temporaries and sources of a few MB each. glibc's malloc keeps such memory in its heap for the next
allocation, and loading allocates nothing more of that kind, so without this the process would keep it for
the whole run: on the 1B shape's Q4_0 file 1.0 GB of 2.4 GB resident after loading, and 0.4 GB more at the
peak.
"""

import ctypes

TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; elsewhere (macOS, musl) nothing is done


def return_freed_heap() -> None:
    """Give the C heap's free memory back to the system (malloc_trim(0); a millisecond or so)."""
    if TRIM is not None:
        TRIM(0)
