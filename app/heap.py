"""The C heap of a process that handles buffers of megabytes, file after file.

glibc gives each buffer over its mmap threshold (128 KiB at first, adjusted as blocks are freed)
pages of its own and unmaps them when it is freed, and returns the top of the heap to the system
once more than its trim threshold is free there; the next file's buffers then fault in fresh,
zeroed pages again (the sender: ~1,500 page faults and a fifth of its CPU in the kernel for a
big run's shard file of 5,000 rows; docs/performance.md). `keep_freed` sets both thresholds so
that freed buffers stay in the heap for the next file.
"""
from __future__ import annotations

import ctypes

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Buffers above this still get pages of their own (glibc accepts at most 32 MiB on 64-bit):
# larger than any buffer of one file's or one chunk's (4 MiB of lines, their TSV: below 16 MiB).
MMAP_THRESHOLD = 16 << 20


def keep_freed(trim_bytes: int) -> bool:
    """Keep up to `trim_bytes` of freed memory in the heap, and buffers up to MMAP_THRESHOLD in
    it, for the next ones (glibc's `mallopt`). 0 leaves the allocator as it is. False where
    nothing was set: 0, or a C library without glibc's `mallopt` (its allocator as it is)."""
    if trim_bytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, min(MMAP_THRESHOLD, trim_bytes)) and mallopt(M_TRIM_THRESHOLD, trim_bytes))
