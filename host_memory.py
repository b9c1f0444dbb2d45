"""Keep the memory a CPU training step frees, so that the next step reuses it.

glibc's malloc hands a block above its mmap threshold back to the OS as soon as it is freed,
and trims the heap when more than its trim threshold lies free at the top. Both start small
(128 KiB) and adapt upward only so far (the mmap threshold to 32 MiB), while a CPU training step
allocates and frees activation buffers of tens to hundreds of MB: by default every step maps
them anew and page-faults through every page. Raising both thresholds keeps those buffers in
the heap: `bench/host_memory_bench.py` measured a whole simple-cnn `cfrobust train` at 0.92x
the time for 1.09x the peak memory. glibc only: elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20

# The user's own choice wins: glibc's tunables, or CFROBUST_SYSTEM_MALLOC=1 for its defaults.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "CFROBUST_SYSTEM_MALLOC")


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the loader workers it forks
    later), unless the environment sets them; True when they were raised."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
