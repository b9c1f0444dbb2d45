"""`--cf cagan`: batched CAGAN inference inside `cfrobust preprocess`.

The classical fills run per record in the worker processes; CAGAN needs a model and batches, so
`make_sample` leaves the resized image in the sample (under `CAGAN_SOURCE`) and this stage, in
the main process, fills those in batches and encodes them, keeping the records' order.

The generator sees the image at its own working size (the size it was trained at, 256 for the
released models) and its output replaces only the hole, resized back to the stored size: the
pixels outside the boxes stay the stored image's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from cfrobust.errors import UserError
from cfrobust.shards.schema import boxes_to_mask, cf_ext, encode_jpeg

CAGAN_SOURCE = "_cagan_source"  # sample slot carrying the resized image from make_sample to here
RELEASED_SIZE = 256  # the released DeepFill v1 models were trained on 256x256 crops


@dataclass(frozen=True)
class CaganSettings:
    weights: Path
    device: str = "auto"  # CUDA (this torchrun process's GPU) when there is one
    batch_size: int = 32


class CaganFill:
    """Fills the union of each image's boxes with the generator's output."""

    def __init__(self, settings: CaganSettings):
        from cfrobust.preprocess.cagan.weights import load_generator

        if not Path(settings.weights).is_file():
            raise UserError(f"--cagan-weights {settings.weights}: no such file")
        self.settings = settings
        self.generator = load_generator(settings.weights, device="cpu").eval()
        meta = getattr(self.generator, "meta", None) or {}
        self.work_size = int(meta.get("image_size", RELEASED_SIZE))
        self.device = None  # moved on first use: worker processes fork before any CUDA context exists

    def __call__(self, images: list[np.ndarray], boxes: list[list]) -> list[np.ndarray]:
        import torch

        from cfrobust.distributed import choose_device  # torch loads only when CAGAN runs

        if self.device is None:
            self.device = choose_device(self.settings.device, int(os.environ.get("LOCAL_RANK", "0")))
            self.generator.to(self.device)
        small = np.stack([cv2.resize(im, (self.work_size,) * 2, interpolation=cv2.INTER_AREA) for im in images])
        holes = np.stack([scaled_hole(b, im.shape, self.work_size) for im, b in zip(images, boxes)])
        with torch.inference_mode():
            x = torch.from_numpy(small).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            m = torch.from_numpy(holes).to(self.device)[:, None].float()
            _, refined = self.generator(x * (1 - m), m)
            out = ((refined.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [paste(im, b, filled) for im, b, filled in zip(images, boxes, out)]


def scaled_hole(boxes: list, shape: tuple, size: int) -> np.ndarray:
    """The boxes' rectangle hole at the generator's working size."""
    height, width = shape[:2]
    scale = np.array([size / width, size / height] * 2)
    return boxes_to_mask([np.asarray(b) * scale for b in boxes], size, size)


def paste(image: np.ndarray, boxes: list, filled: np.ndarray) -> np.ndarray:
    """`image` with its hole taken from `filled` (generator output at its working size)."""
    height, width = image.shape[:2]
    hole = boxes_to_mask(boxes, width, height)
    back = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
    out = image.copy()
    out[hole] = back[hole]
    return out


def fill_cagan_samples(
    outcomes: Iterator[tuple], fill: CaganFill, position: int = 0
) -> Iterator[tuple]:
    """Pass (record, outcome) pairs through, filling `cf_cagan` of the samples that need it.

    Batches end at multiples of the batch size counted from the split's first record, so a run
    resumed at `position` batches its records exactly as an uninterrupted run did.
    """
    batch_size = fill.settings.batch_size
    pending: list[tuple] = []
    for pair in outcomes:
        pending.append(pair)
        position += 1
        if position % batch_size == 0:
            yield from _filled(pending, fill)
            pending = []
    yield from _filled(pending, fill)


def _filled(pairs: list[tuple], fill: CaganFill) -> list[tuple]:
    samples = [s for _, s in pairs if isinstance(s, dict) and CAGAN_SOURCE in s]
    if samples:
        sources = [s.pop(CAGAN_SOURCE) for s in samples]
        results = fill([image for image, _ in sources], [boxes for _, boxes in sources])
        for sample, result in zip(samples, results):
            sample[cf_ext("cagan")] = encode_jpeg(result)
    return pairs
