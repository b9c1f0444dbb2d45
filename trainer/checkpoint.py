"""Checkpoints: written atomically, read back with weights_only=True (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

from cfrobust.errors import UserError
from cfrobust.files import load_torch_safely, save_torch_atomically


def save_checkpoint(path: Path, state: dict) -> None:
    save_torch_atomically(state, path)  # a crash never leaves a torn checkpoint


def load_checkpoint(path, map_location="cpu") -> dict:
    state = load_torch_safely(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a cfrobust checkpoint (no model/config entries)")
    return state
