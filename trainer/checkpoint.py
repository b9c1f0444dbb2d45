"""Checkpoints: written atomically, read back with weights_only=True (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from cfrobust.errors import UserError
from cfrobust.files import save_torch_atomically


def save_checkpoint(path: Path, state: dict) -> None:
    save_torch_atomically(state, path)  # a crash never leaves a torn checkpoint


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a readable cfrobust checkpoint ({type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a cfrobust checkpoint (no model/config entries)")
    return state
