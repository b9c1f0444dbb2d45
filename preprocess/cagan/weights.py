"""CAGAN generator weights: import from a TensorFlow checkpoint's variables, and cfrobust's own
weight file (`torch.save` of a plain dict, loaded with `weights_only=True`).

Channel order. The released DeepFill v1 models were trained and run on BGR images (neuralgym reads
with `cv2.imread`; the official `test.py` feeds that array to the model as it is), while cfrobust
feeds RGB. The import therefore swaps the red and blue slices of the convolutions that read the
image (the first conv of each branch fed by image + ones + mask) and of those that write it (the
last conv of each stage): the imported generator fed RGB gives exactly what the release gives on
the same picture in BGR, in RGB. A weight file records, under "channels", the order its tensors
take and give; cfrobust writes "rgb" (imports are converted, `cagan train` learns on RGB), and a
file without the record (written before it existed) is read as RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cfrobust.errors import UserError
from cfrobust.files import load_torch_safely, save_torch_atomically
from cfrobust.preprocess.cagan.network import Generator

FORMAT = "cfrobust.cagan/1"
FIRST_KERNEL = "inpaint_net/conv1/kernel"  # 5x5 x 5 inputs x cnum outputs: gives cnum
CHANNEL_ORDERS = ("rgb", "bgr")
RELEASED_CHANNELS = "bgr"  # the order the released TF models were trained in
# Convolutions whose input channels 0:3 are the image (then the ones plane and the mask), and
# convolutions whose 3 outputs are the image: all a change of channel order touches.
IMAGE_READERS = ("coarse.conv1.weight", "dilated.xconv1.weight", "attention_in.pmconv1.weight")
IMAGE_WRITERS = ("coarse.conv17.weight", "coarse.conv17.bias", "merge.allconv17.weight", "merge.allconv17.bias")


def tf_variable_name(state_key: str) -> str:
    """The TF variable behind a state_dict key, e.g. `coarse.conv13_upsample.weight` ->
    `inpaint_net/conv13_upsample/conv13_upsample_conv/kernel` (see network.py's table)."""
    _, layer, kind = state_key.split(".")
    scope = f"{layer}/{layer}_conv" if layer.endswith("_upsample") else layer
    return f"inpaint_net/{scope}/{'kernel' if kind == 'weight' else 'bias'}"


def swap_red_blue(state: dict) -> dict:
    """`state` for images in the other channel order (RGB <-> BGR): the image slices of
    IMAGE_READERS and the outputs of IMAGE_WRITERS reversed, every other tensor as it is. Its own
    inverse."""
    swapped = dict(state)
    for key in IMAGE_READERS:
        weight = state[key]
        swapped[key] = torch.cat([weight[:, :3].flip(1), weight[:, 3:]], 1)
    for key in IMAGE_WRITERS:
        swapped[key] = state[key].flip(0)
    return swapped


def check_channel_order(order, what: str) -> str:
    if order not in CHANNEL_ORDERS:
        raise UserError(f"{what}: unknown channel order {order!r} (expected one of {', '.join(CHANNEL_ORDERS)})")
    return order


def generator_state_from_tf(variables: dict[str, np.ndarray], trained_on: str = RELEASED_CHANNELS) -> tuple[int, dict]:
    """(cnum, state_dict) of the generator stored in a TF checkpoint's variables (name -> array,
    as `read_tf_checkpoint` gives), converted from the channel order it was `trained_on` (BGR
    for the released models) to RGB, the order cfrobust feeds. Discriminator, optimizer-slot and
    step variables are ignored."""
    check_channel_order(trained_on, "TF checkpoint")
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
    return cnum, (swap_red_blue(state) if trained_on == "bgr" else state)


def save_weights(path, generator: Generator, meta: dict | None = None, channels: str = "rgb") -> None:
    """Write `generator` to `path` atomically (a reader never sees half a file). `meta` (plain
    JSON-like values, e.g. {"image_size": 256, "source": ...}) defaults to generator.meta;
    `channels` records the image channel order its tensors take and give."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "cnum": generator.cnum,
        "channels": check_channel_order(channels, str(path)),
        "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "meta": dict(getattr(generator, "meta", {}) if meta is None else meta),
    }
    save_torch_atomically(payload, path)


def load_generator(path, device="cpu") -> Generator:
    """The generator saved by `save_weights`, on `device`, in eval mode, taking and giving RGB
    whatever channel order the file records (none recorded: RGB); `.meta` holds its meta."""
    payload = load_torch_safely(path, "CAGAN weight file", device)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a cfrobust CAGAN weight file (expected format {FORMAT})")
    channels = check_channel_order(payload.get("channels", "rgb"), str(path))
    generator = Generator(int(payload["cnum"]))
    try:
        state = payload["state_dict"]
        generator.load_state_dict(swap_red_blue(state) if channels == "bgr" else state)
    except (RuntimeError, KeyError, TypeError, IndexError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: damaged CAGAN weight file ({first_line})") from None
    generator.meta = dict(payload.get("meta") or {})
    return generator.to(device).eval()
