"""Objects of the benchmark family: shapes as polygons, rasterised at pixel centres, with an outline.

Each shape is scaled so that its box's longer side is the drawn size, so box and size say nothing of the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]
CIRCLE_POINTS = 48
BLACK, WHITE = np.array([0, 0, 0], np.uint8), np.array([255, 255, 255], np.uint8)


@dataclass
class ObjectLayer:
    """What is painted over the background; identical in a dataset and its uncorrelated twin."""

    shape: str
    mask: np.ndarray  # HxW bool, the object's pixels
    outline: np.ndarray  # HxW bool, the mask's border pixels (inside the mask)
    fill: np.ndarray  # RGB uint8
    edge: np.ndarray  # RGB uint8, black or white: whichever contrasts with the fill
    box: Box  # tight box of the mask, far edges exclusive

    def paint(self, image: np.ndarray) -> None:
        image[self.mask] = self.fill
        # The outline contrasts with the fill, so the silhouette shows on any background.
        image[self.outline] = self.edge


def draw_object(rng: np.random.Generator, shapes: tuple[str, ...], size_range, centred: bool, side: int) -> ObjectLayer:
    """One object of a class with the given shapes, in a `side` x `side` image."""
    shape = shapes[int(rng.integers(len(shapes)))]
    loops = unit_loops(shape, rng)
    longest = rng.uniform(*size_range) * side
    loops = _rotated(loops, rng.uniform(0.0, 2 * np.pi))
    loops = _placed(loops, longest, centred, side, rng)
    mask = rasterise(loops, side)
    fill = rng.integers(0, 256, 3).astype(np.uint8)
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return ObjectLayer(shape, mask, border(mask), fill, BLACK if luminance > 110 else WHITE, tight_box(mask))


def unit_loops(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """The shape's closed outlines (Nx2 x, y) around the origin; several loops cut holes (even-odd)."""
    if shape == "disk":
        return [_ellipse(1.0)]
    if shape == "ellipse":
        return [_ellipse(rng.uniform(0.5, 0.8))]
    if shape == "blob":  # a potato: a disk with a gently wobbling radius, no corners
        angle = np.linspace(0, 2 * np.pi, CIRCLE_POINTS, endpoint=False)
        radius = 1 + 0.12 * np.sin(2 * angle + rng.uniform(0, 2 * np.pi)) + 0.06 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
        return [np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)]
    if shape == "ring":
        outer = _ellipse(rng.uniform(0.75, 1.0))
        return [outer, 0.55 * outer]
    if shape == "square":
        return [_regular(4, np.pi / 4)]
    if shape == "rectangle":
        return [_regular(4, np.pi / 4) * [1.0, rng.uniform(0.5, 0.8)]]
    if shape == "diamond":  # a rhombus with 60-degree corners
        return [_regular(4, 0.0) * [1.0, np.tan(np.pi / 6)]]
    if shape == "triangle":
        return [_regular(3, np.pi / 2)]
    if shape in ("star", "star6"):
        return [_star(5 if shape == "star" else 6, 0.45)]
    if shape == "cross":
        arm = 0.32  # half-width of each arm, as a fraction of the half-length
        corners = [(arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1), (-arm, -1),
                   (-arm, -arm), (-1, -arm), (-1, arm), (-arm, arm), (-arm, 1), (arm, 1)]
        return [np.array(corners, float)]
    if shape == "frame":
        square = _regular(4, np.pi / 4)
        return [square, 0.55 * square]
    if shape == "delta":  # a triangle with a triangular hole
        triangle = _regular(3, np.pi / 2)
        return [triangle, 0.4 * triangle]
    raise ValueError(f"unknown shape {shape!r}")


def rasterise(loops: list[np.ndarray], side: int) -> np.ndarray:
    """Pixels whose centres lie inside the loops by the even-odd rule, as an HxW bool mask."""
    points = np.concatenate(loops)
    x0, y0 = np.clip(np.floor(points.min(axis=0)).astype(int), 0, side)
    x1, y1 = np.clip(np.ceil(points.max(axis=0)).astype(int), 0, side)
    py, px = np.mgrid[y0:y1, x0:x1] + 0.5
    py, px = py[..., None], px[..., None]
    crossings = np.zeros(py.shape[:2], int)
    for loop in loops:
        (ax, ay), (bx, by) = loop.T, np.roll(loop, -1, axis=0).T
        straddles = (ay > py) != (by > py)
        dy = np.where(by == ay, 1.0, by - ay)  # horizontal edges never straddle; avoid 0/0
        x_at = ax + (py - ay) * (bx - ax) / dy
        crossings += (straddles & (px < x_at)).sum(axis=-1)
    mask = np.zeros((side, side), bool)
    mask[y0:y1, x0:x1] = crossings % 2 == 1
    return mask


def border(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the image's edge counts as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def tight_box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _ellipse(aspect: float) -> np.ndarray:
    angle = np.linspace(0, 2 * np.pi, CIRCLE_POINTS, endpoint=False)
    return np.stack([np.cos(angle), aspect * np.sin(angle)], axis=1)


def _regular(corners: int, start: float) -> np.ndarray:
    angle = start + np.arange(corners) * 2 * np.pi / corners
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    angle = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def _rotated(loops: list[np.ndarray], angle: float) -> list[np.ndarray]:
    turn = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    return [loop @ turn for loop in loops]


def _placed(loops: list[np.ndarray], longest: float, centred: bool, side: int, rng: np.random.Generator):
    """Scale so the box's longer side is `longest` pixels, then move the box inside the image:
    anywhere, or within 10% of the side from the centre."""
    points = np.concatenate(loops)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = longest / (high - low).max()
    half = (high - low) * scale / 2  # (half width, half height) of the box
    if centred:
        centre = side / 2 + rng.uniform(-0.1, 0.1, 2) * side
        centre = np.clip(centre, half, side - half)
    else:
        centre = rng.uniform(half, side - half)
    return [(loop - (low + high) / 2) * scale + centre for loop in loops]
