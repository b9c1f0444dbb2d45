"""CAGAN generator weights: import from a TensorFlow checkpoint's variables, and cfrobust's own
weight file (`torch.save` of a plain dict, loaded with `weights_only=True`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfrobust.errors import UserError
from cfrobust.files import load_torch_safely, save_torch_atomically
from cfrobust.preprocess.cagan.network import Generator

FORMAT = "cfrobust.cagan/1"
FIRST_KERNEL = "inpaint_net/conv1/kernel"  # 5x5 x 5 inputs x cnum outputs: gives cnum


def tf_variable_name(state_key: str) -> str:
    """The TF variable behind a state_dict key, e.g. `coarse.conv13_upsample.weight` ->
    `inpaint_net/conv13_upsample/conv13_upsample_conv/kernel` (see network.py's table)."""
    _, layer, kind = state_key.split(".")
    scope = f"{layer}/{layer}_conv" if layer.endswith("_upsample") else layer
    return f"inpaint_net/{scope}/{'kernel' if kind == 'weight' else 'bias'}"


def generator_state_from_tf(variables: dict[str, np.ndarray]) -> tuple[int, dict]:
    """(cnum, state_dict) of the generator stored in a TF checkpoint's variables (name -> array,
    as `read_tf_checkpoint` gives). Discriminator, optimizer-slot and step variables are ignored."""
    if FIRST_KERNEL not in variables:
        raise UserError(f"not a DeepFill v1 (CAGAN) checkpoint: no variable {FIRST_KERNEL}")
    cnum = int(np.shape(variables[FIRST_KERNEL])[-1])
    state = {}
    for key, param in Generator(cnum).state_dict().items():
        name = tf_variable_name(key)
        if name not in variables:
            raise UserError(f"CAGAN checkpoint: variable {name} is missing")
        value = np.asarray(variables[name], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # TF kernels are HWIO, torch weights OIHW
        if value.shape != tuple(param.shape):
            expected = param.shape if param.ndim != 4 else param.permute(2, 3, 1, 0).shape
            raise UserError(
                f"CAGAN checkpoint: variable {name} has shape {list(np.shape(variables[name]))}, "
                f"expected {list(expected)} for cnum={cnum}"
            )
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return cnum, state


def save_weights(path, generator: Generator, meta: dict | None = None) -> None:
    """Write `generator` to `path` atomically (a reader never sees half a file). `meta` (plain
    JSON-like values, e.g. {"image_size": 256, "source": ...}) defaults to generator.meta."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "cnum": generator.cnum,
        "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "meta": dict(getattr(generator, "meta", {}) if meta is None else meta),
    }
    save_torch_atomically(payload, path)


def load_generator(path, device="cpu") -> Generator:
    """The generator saved by `save_weights`, on `device`, in eval mode; `.meta` holds its meta."""
    payload = load_torch_safely(path, "CAGAN weight file", device)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a cfrobust CAGAN weight file (expected format {FORMAT})")
    generator = Generator(int(payload["cnum"]))
    try:
        generator.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: damaged CAGAN weight file ({first_line})") from None
    generator.meta = dict(payload.get("meta") or {})
    return generator.to(device).eval()
