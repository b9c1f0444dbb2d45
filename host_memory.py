"""Keep the memory a CPU training step frees, so that the next step reuses it.

glibc's malloc hands a block above its mmap threshold back to the OS as soon as it is freed,
and trims the heap when more than its trim threshold lies free at the top. Both start small
(128 KiB) and adapt upward only so far (the mmap threshold to 32 MiB), while a CPU training step
allocates and frees activation buffers of tens to hundreds of MB: by default every step maps
them anew and page-faults through every page. Raising both thresholds keeps those buffers in
the heap: `bench/process_settings_bench.py --setting malloc` measured a whole simple-cnn
`cfrobust train` at 0.88x-0.92x the time for 1.09x the peak memory. glibc only: elsewhere (musl,
macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# Tried in order: glibc before 2.35 refuses an mmap threshold above 32 MiB (half its heap size).
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 512 << 20

# The user's own choice wins: glibc's malloc settings, or CFROBUST_SYSTEM_MALLOC=1 for its defaults.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                 "CFROBUST_SYSTEM_MALLOC")


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the loader workers it forks
    later), unless the environment sets malloc's behaviour; True when both were raised."""
    if user_sets_malloc(os.environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mmap_raised = any(libc.mallopt(_M_MMAP_THRESHOLD, value) for value in MMAP_THRESHOLDS)
    trim_raised = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return mmap_raised and trim_raised


def user_sets_malloc(environ) -> bool:
    return any(name in environ for name in USER_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
