"""Checkpoints: written atomically, read back with weights_only=True (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from cfrobust.errors import UserError
from cfrobust.files import load_torch_safely, save_torch_atomically
from cfrobust.trainer.counterfactual import output_size
from cfrobust.trainer.models import build_model


def save_checkpoint(path: Path, state: dict) -> None:
    save_torch_atomically(state, path)  # a crash never leaves a torn checkpoint


def load_checkpoint(path, map_location="cpu") -> dict:
    state = load_torch_safely(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a cfrobust checkpoint (no model/config entries)")
    return state


def load_classifier(path) -> tuple[torch.nn.Module, dict, list[str]]:
    """The trained model of a checkpoint (on the CPU, its mode unchanged), its config and its
    class names; a checkpoint that lacks them or whose weights do not fit its architecture is
    named in one line."""
    state = load_checkpoint(path)
    config, classes = state["config"], state.get("classes")
    if not isinstance(classes, list) or not classes or not isinstance(config, dict) or "arch" not in config:
        raise UserError(f"{path}: not a checkpoint of `cfrobust train` (no class names or architecture)")
    model = build_model(config["arch"], output_size(len(classes), config.get("cf_loss", "logp")))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: the weights do not fit a {config['arch']} with {len(classes)} classes ({first})") from None
    return model, config, list(classes)
