"""Counterfactual fills: remove the object (the union of its boxes) and fill the hole.

Each fill maps (HxWx3 uint8 RGB image, boxes in its pixels) to a new image of the same shape;
pixels outside the hole are never changed. The hole is always the boxes' rectangle, even when a
mask exists, so the fill does not leak the object's shape (DESIGN §5).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cfrobust.shards.schema import MEAN_RGB_UINT8, boxes_to_mask

Fill = Callable[[np.ndarray, list], np.ndarray]


def fill_mean(image: np.ndarray, boxes: list) -> np.ndarray:
    """The normalisation mean colour (0 in the model's input space, up to uint8 rounding)."""
    out = image.copy()
    out[boxes_to_mask(boxes, image.shape[1], image.shape[0])] = MEAN_RGB_UINT8
    return out


def fill_tile(image: np.ndarray, boxes: list) -> np.ndarray:
    """The largest object-free band of the image (full-width rows or full-height columns),
    repeated across the image and pasted into the hole, as the official `tile` fill.

    When the boxes touch every row and every column there is no band; the hole then takes
    the mean colour of the pixels outside it (or the `mean` fill if nothing is outside).
    """
    hole = boxes_to_mask(boxes, image.shape[1], image.shape[0])
    out = image.copy()
    if hole.any():
        out[hole] = tiled_background(image, hole)[hole]
    return out


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


FILLS: dict[str, Fill] = {
    "mean": fill_mean,
    "tile": fill_tile,
}
