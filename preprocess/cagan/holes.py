"""Training holes for the CAGAN inpainter: random rectangles in each image's background.

A counterfactual asks the inpainter to invent background where the object was, so it is trained
to complete background only: every hole avoids the image's object boxes. Sampling is seeded by
the caller's generator and vectorised over the batch (numpy; no torch needed).
"""

from __future__ import annotations

import numpy as np

TRIES = 16  # random rectangles tried per image before the fallback
GRID = 32  # cells per side of the occupancy grid the fallback searches


def size_range(side: int, min_fraction: float = 0.25, max_fraction: float = 0.5) -> tuple[int, int]:
    """Smallest and largest hole side for an image side (the official code's holes span 3/8-1/2)."""
    high = max(1, int(side * max_fraction))
    return min(high, max(1, int(round(side * min_fraction)))), high


def box_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float boxes (x0, y0, x1, y1) -> the integer pixel ranges they touch, [x0, x1) x [y0, y1)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(*np.shape(boxes)[:-1], 4)
    low = np.floor(boxes[..., :2])
    high = np.ceil(boxes[..., 2:])
    limits = np.array([width, height])
    return np.concatenate([np.clip(low, 0, limits), np.clip(high, 0, limits)], axis=-1).astype(np.int64)


def overlaps(holes: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """holes [..., T, 4] and pixel boxes [..., K, 4] (all x0, y0, x1, y1) -> [..., T] any overlap."""
    h = holes[..., :, None, :]
    b = boxes[..., None, :, :]
    hit = (h[..., 0] < b[..., 2]) & (h[..., 2] > b[..., 0]) & (h[..., 1] < b[..., 3]) & (h[..., 3] > b[..., 1])
    return (hit & valid[..., None, :]).any(axis=-1)


def sample_holes(
    boxes,
    valid,
    height: int,
    width: int,
    rng: np.random.Generator,
    min_fraction: float = 0.25,
    max_fraction: float = 0.5,
    tries: int = TRIES,
) -> tuple[np.ndarray, np.ndarray]:
    """One box-free rectangular hole per image.

    boxes [N, K, 4] (x0, y0, x1, y1, pixels, floats) with valid [N, K]. Returns holes [N, 4] as
    integer (x0, y0, x1, y1), exclusive ends, and kept [N] bool. Each side is drawn uniformly
    between min_fraction and max_fraction of the image side, the position uniformly; the first of
    `tries` draws that misses every box wins. When none does, the hole is drawn inside the largest
    box-free rectangle (found on a 32x32 grid, conservatively), sides down to half the minimum;
    when even that is too small (an object covering nearly the whole image) the image is not kept:
    its hole is empty and the training losses leave it out.
    """
    boxes = box_pixels(np.asarray(boxes, dtype=np.float64).reshape(len(valid), -1, 4), height, width)
    valid = np.asarray(valid, dtype=bool).reshape(len(boxes), -1)
    count = len(boxes)
    low_h, high_h = size_range(height, min_fraction, max_fraction)
    low_w, high_w = size_range(width, min_fraction, max_fraction)
    hole_h = rng.integers(low_h, high_h + 1, size=(count, tries))
    hole_w = rng.integers(low_w, high_w + 1, size=(count, tries))
    y0 = (rng.random((count, tries)) * (height - hole_h + 1)).astype(np.int64)
    x0 = (rng.random((count, tries)) * (width - hole_w + 1)).astype(np.int64)
    candidates = np.stack([x0, y0, x0 + hole_w, y0 + hole_h], axis=-1)  # [N, T, 4]
    free = ~overlaps(candidates, boxes, valid)
    first = free.argmax(axis=1)
    holes = candidates[np.arange(count), first]
    kept = free.any(axis=1)
    for i in np.flatnonzero(~kept):
        hole = hole_in_largest_free(boxes[i][valid[i]], height, width, rng, (low_h, high_h), (low_w, high_w))
        if hole is not None:
            holes[i], kept[i] = hole, True
        else:
            holes[i] = 0
    return holes, kept


def hole_in_largest_free(boxes, height, width, rng, sizes_h, sizes_w):
    """A hole inside the largest box-free rectangle, or None when that is smaller than half the
    minimum hole side in either direction."""
    x0, y0, x1, y1 = largest_free_rectangle(boxes, height, width)
    room_h, room_w = y1 - y0, x1 - x0
    if room_h < max(1, sizes_h[0] // 2) or room_w < max(1, sizes_w[0] // 2):
        return None
    h = int(rng.integers(min(sizes_h[0], room_h), min(sizes_h[1], room_h) + 1))
    w = int(rng.integers(min(sizes_w[0], room_w), min(sizes_w[1], room_w) + 1))
    top = y0 + int(rng.integers(0, room_h - h + 1))
    left = x0 + int(rng.integers(0, room_w - w + 1))
    return np.array([left, top, left + w, top + h])


def largest_free_rectangle(boxes, height: int, width: int, grid: int = GRID) -> tuple[int, int, int, int]:
    """The largest rectangle of whole grid cells that no box touches, as (x0, y0, x1, y1) pixels.

    boxes are integer pixel ranges [x0, x1) x [y0, y1). The image is cut into at most grid x grid
    cells; a cell any box touches is occupied, so the answer never overlaps a box (it may be a
    little smaller than the true largest free rectangle). For every band of rows at once, the
    widest run of free columns is found with cumulative sums. Returns an empty rectangle when
    every cell is occupied.
    """
    rows = np.unique(np.round(np.linspace(0, height, min(grid, height) + 1)).astype(np.int64))
    cols = np.unique(np.round(np.linspace(0, width, min(grid, width) + 1)).astype(np.int64))
    occupied = np.zeros((len(rows) - 1, len(cols) - 1), dtype=np.int64)
    for bx0, by0, bx1, by1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        if bx1 > bx0 and by1 > by0:
            occupied[np.ix_((rows[:-1] < by1) & (rows[1:] > by0), (cols[:-1] < bx1) & (cols[1:] > bx0))] = 1
    sums = np.zeros((occupied.shape[0] + 1, occupied.shape[1]), dtype=np.int64)
    sums[1:] = occupied.cumsum(0)
    top, bottom = np.triu_indices(occupied.shape[0])  # every band of cell rows top..bottom
    blocked = (sums[bottom + 1] - sums[top]) > 0  # [bands, columns]
    reach = np.cumsum(np.where(blocked, 0, np.diff(cols)), axis=1)
    run = reach - np.maximum.accumulate(np.where(blocked, reach, 0), axis=1)  # free width ending here
    area = (rows[bottom + 1] - rows[top])[:, None] * run
    band, last = np.unravel_index(int(area.argmax()), area.shape)
    if area[band, last] <= 0:
        return (0, 0, 0, 0)
    x1 = int(cols[last + 1])
    return (x1 - int(run[band, last]), int(rows[top[band]]), x1, int(rows[bottom[band] + 1]))


def local_patch_origin(holes: np.ndarray, patch_h: int, patch_w: int, height: int, width: int) -> np.ndarray:
    """Top-left (x, y) of the fixed-size local-critic patch centred on each hole, kept inside the
    image; a hole no larger than the patch lies wholly inside it."""
    holes = np.asarray(holes)
    left = holes[:, 0] - (patch_w - (holes[:, 2] - holes[:, 0])) // 2
    top = holes[:, 1] - (patch_h - (holes[:, 3] - holes[:, 1])) // 2
    return np.stack([np.clip(left, 0, width - patch_w), np.clip(top, 0, height - patch_h)], axis=1)
