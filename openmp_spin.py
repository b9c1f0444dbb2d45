"""Shorter spin-waiting for PyTorch's OpenMP threads, so the loader gets the cores between steps.

PyTorch's CPU kernels run on a GNU OpenMP (libgomp) thread team. When a kernel ends, the team's
idle threads spin for GOMP_SPINCOUNT iterations before they sleep: 300,000 by default, several
milliseconds. With `--workers 0` the next batch is read and decoded right after each step, in
the same process, and for most of that time the spinning threads hold the cores its decode
helper threads need. 10,000 iterations still bridge the microsecond gaps between the kernels of
a step. `bench/process_settings_bench.py --setting openmp` times whole training runs under
both.

The count is read once, when libgomp loads (when torch is first imported), so the CLI calls
this before any command imports torch; it is inherited by every process the command starts.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

SPIN_COUNT = "10000"
# The user's own choice wins (OMP_WAIT_POLICY=active or passive sets the spinning too).
USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CFROBUST_OPENMP_DEFAULTS")


def shorten_openmp_spin(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT for the OpenMP runtime this process loads later, unless the
    environment already chooses how OpenMP threads wait or torch is already loaded (too late);
    True when set."""
    if any(name in environ for name in USER_SETTINGS) or "torch" in sys.modules:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
