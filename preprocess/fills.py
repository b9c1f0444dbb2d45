"""Counterfactual fills: remove the object (the union of its boxes) and fill the hole.

Each fill maps (HxWx3 uint8 RGB image, boxes in its pixels, rng=) to a new image of the same
shape; pixels outside the hole are never changed. The hole is always the boxes' rectangle, even
when a mask exists, so the fill does not leak the object's shape (DESIGN §5). Random fills draw
from `rng` (the pipeline passes `record_rng(key, method)`, so shards are reproducible); the
others accept and ignore it.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import cv2
import numpy as np

from cfrobust.shards.schema import MEAN_RGB_UINT8, RANDOM_NOISE_STD, box_pixel_bounds, boxes_to_mask

Fill = Callable[..., np.ndarray]  # fill(image, boxes, rng=None) -> image

INPAINT_RADIUS = 3  # pixels around the hole cv2.inpaint looks at


def record_rng(key: str, method: str) -> np.random.Generator:
    """A generator seeded by the record and the fill alone, so the same record gets the same
    random fill in any run, worker count or order (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{method}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def fill_mean(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """The normalisation mean colour (0 in the model's input space, up to uint8 rounding)."""
    out = image.copy()
    for rows, cols in box_slices(boxes, image.shape[1], image.shape[0]):
        out[rows, cols] = MEAN_RGB_UINT8
    return out


def box_slices(boxes: list, width: int, height: int) -> list[tuple[slice, slice]]:
    """(rows, cols) of the pixels each box touches. Filling box by box with slices is several
    times faster than a boolean hole mask on small images; overlapping boxes just refill."""
    bounds = [box_pixel_bounds(box, width, height) for box in boxes]
    return [(slice(r0, r1), slice(c0, c1)) for c0, r0, c1, r1 in bounds if c1 > c0 and r1 > r0]


def paste(image: np.ndarray, boxes: list, source: np.ndarray) -> np.ndarray:
    """A copy of `image` whose hole is taken from `source` (same shape)."""
    out = image.copy()
    for rows, cols in box_slices(boxes, image.shape[1], image.shape[0]):
        out[rows, cols] = source[rows, cols]
    return out


def fill_tile(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """The largest object-free band of the image (full-width rows or full-height columns),
    repeated across the image and pasted into the hole, as the official `tile` fill.

    When the boxes touch every row and every column there is no band; the hole then takes
    the mean colour of the pixels outside it (or the `mean` fill if nothing is outside).
    """
    if not box_slices(boxes, image.shape[1], image.shape[0]):
        return image.copy()
    return paste(image, boxes, tiled_background(image, boxes_to_mask(boxes, image.shape[1], image.shape[0])))


def longest_run(free: np.ndarray) -> tuple[int, int]:
    """(start, length) of the first longest run of True in a 1-D bool array; (0, 0) if none."""
    index = np.arange(len(free))
    last_blocked = np.maximum.accumulate(np.where(free, -1, index))
    run_length = index - last_blocked  # length of the free run that ends at each position
    end = int(np.argmax(run_length))
    length = int(run_length[end])
    return (end - length + 1, length) if length else (0, 0)


def tiled_background(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The whole image rebuilt from its largest hole-free band (the band itself stays in place)."""
    height, width = hole.shape
    row_start, rows = longest_run(~hole.any(axis=1))
    col_start, cols = longest_run(~hole.any(axis=0))
    if rows == 0 and cols == 0:
        outside = image[~hole]
        colour = outside.mean(axis=0).round() if len(outside) else np.array(MEAN_RGB_UINT8)
        return np.broadcast_to(colour.astype(np.uint8), image.shape)
    if rows * width >= cols * height:
        source_rows = row_start + (np.arange(height) - row_start) % rows
        return image[source_rows]
    source_cols = col_start + (np.arange(width) - col_start) % cols
    return image[:, source_cols]


def fill_random(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """One random colour per image (uniform per channel) plus Gaussian noise per pixel, as the
    official `random` inpainter (see RANDOM_NOISE_STD)."""
    rng = rng if rng is not None else np.random.default_rng()
    colour = rng.uniform(0, 255, size=3)
    out = image.copy()
    for rows, cols in box_slices(boxes, image.shape[1], image.shape[0]):
        shape = (rows.stop - rows.start, cols.stop - cols.start, 3)
        out[rows, cols] = np.clip(colour + rng.normal(0, RANDOM_NOISE_STD, size=shape), 0, 255).round()
    return out


def fill_shuffle(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image's own values, all pixels and channels randomly permuted, pasted into the hole.

    The official ShuffleInpainter (robust_cls_model, arch/inpainting/Baseline.py) permutes every
    value of its input ("including channels"), object included, and pastes the result into the
    hole; it permutes across the whole batch, which an offline fill cannot see, so here each
    image is permuted on its own. Only the hole's values of that permutation are drawn (a
    random selection without replacement has the same distribution, at a fraction of the cost).
    """
    rng = rng if rng is not None else np.random.default_rng()
    hole = boxes_to_mask(boxes, image.shape[1], image.shape[0])
    out = image.copy()
    out[hole] = rng.choice(image.reshape(-1), size=int(hole.sum()) * 3, replace=False).reshape(-1, 3)
    return out


def fill_telea(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """OpenCV's fast-marching inpainting (Telea 2004) of the hole."""
    return opencv_inpaint(image, boxes, cv2.INPAINT_TELEA)


def fill_ns(image: np.ndarray, boxes: list, rng: np.random.Generator | None = None) -> np.ndarray:
    """OpenCV's Navier-Stokes inpainting of the hole."""
    return opencv_inpaint(image, boxes, cv2.INPAINT_NS)


def opencv_inpaint(image: np.ndarray, boxes: list, flag: int) -> np.ndarray:
    hole = boxes_to_mask(boxes, image.shape[1], image.shape[0])
    if hole.all():
        # Nothing to propagate from: cv2.inpaint would hand back the image, object included.
        return fill_mean(image, boxes)
    inpainted = cv2.inpaint(np.ascontiguousarray(image), hole.astype(np.uint8) * 255, INPAINT_RADIUS, flag)
    out = image.copy()
    out[hole] = inpainted[hole]  # cv2 leaves the rest alone; copying only the hole guarantees it
    return out


RANDOM_FILLS = frozenset({"random", "shuffle"})  # the fills that draw from their rng

FILLS: dict[str, Fill] = {
    "mean": fill_mean,
    "tile": fill_tile,
    "random": fill_random,
    "shuffle": fill_shuffle,
    "telea": fill_telea,
    "ns": fill_ns,
}
