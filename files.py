"""Torch files written whole or not at all, and read back without running pickled code; paths
compared by what they name.

Writes go to a temporary name, then are renamed: a run killed mid-write (SIGKILL, preemption,
a full disk) leaves the previous file intact, so `--resume` never meets a torn checkpoint. The
temporary name carries the process id: two processes writing the same path never share one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cfrobust.errors import UserError


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


def load_torch_safely(path, what: str, map_location="cpu"):
    """torch.load(weights_only=True) of `path`; a missing or unreadable file is a one-line
    UserError naming it and `what` it should have been (e.g. "checkpoint")."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a directory, not a {what}")
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for a damaged or foreign file
        raise UserError(f"{path}: not a readable {what} ({one_line_reason(exc)})") from None


def one_line_reason(exc: Exception, limit: int = 120) -> str:
    """"Type: first non-empty line of the message", without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(line) > limit:  # cut at a word, and say so
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def resolved_paths(value):
    """`value` (JSON-like) with every string that names an existing file or folder made
    absolute and real, so that a dataset given once as `data/cub` and once as `/home/me/data/cub/`
    compares equal (in the manifests of a resumed run or of several ranks)."""
    if isinstance(value, dict):
        return {k: resolved_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolved_paths(v) for v in value]
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value
