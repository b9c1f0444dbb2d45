"""Files that appear whole or not at all: written under a temporary name, then renamed.

A run killed mid-write (SIGKILL, preemption, a full disk) leaves the previous file intact, so
`--resume` never meets a torn checkpoint. The temporary name carries the process id: two
processes writing the same path never share a temporary.
"""

from __future__ import annotations

import os
from pathlib import Path


def save_torch_atomically(obj, path) -> None:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
