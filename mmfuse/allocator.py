"""glibc's allocator, tuned per process for the big, short-lived tensors of a training step or a loader batch.

By default glibc serves every allocation above its mmap threshold (128 KB, raised dynamically up to 32 MB) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, so the next step's tensor of the same size page-faults
all its pages in again, each zeroed by the kernel: system time that grows with tensor size, paid every step. A
higher mmap threshold serves such tensors from the heap, and a higher trim threshold keeps freed heap memory for
reuse instead of handing it back. This is the runtime form of DESIGN.md's ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` variables, set per process so that other processes keep their defaults.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int, trim_threshold: int) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes, each below 2 GiB: mallopt takes a C int) for this process;
    False where libc is not glibc or refuses."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 < value < 2**31:
            raise ValueError(f"{name}={value}: glibc takes 1 byte to 2 GiB - 1")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
