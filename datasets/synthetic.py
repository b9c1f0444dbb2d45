"""The built-in dataset: shapes on backgrounds that usually, but not always, agree with the label.

The label is the object's shape: a filled disk or a ring of the same outer size, so the
box is no clue and only the pixels inside it decide the class. In training, the background ("land" or
"water" texture) agrees with the label in `correlation` of the images, so a classifier can
shortcut through the background; val and test hold the four groups in equal numbers. Every
image is a pure function of (seed, split, index), so any subset regenerates identically.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.errors import UserError

CLASSES = ["disk", "ring"]
PLACES = ["land", "water"]  # place p "agrees" with label y when p == y
SPLITS = ["train", "val", "test"]
RING_INNER = 0.5  # inner radius of a ring, as a fraction of its outer radius
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


class SyntheticDataset(DatasetSource):
    name = "synthetic"
    classes = CLASSES
    splits = SPLITS
    aligned_groups = [f"{CLASSES[i]}/{PLACES[i]}" for i in range(2)]

    def __init__(
        self,
        seed: int = 0,
        sizes: tuple[int, int, int] = (2000, 400, 800),
        image_size: int = 64,
        correlation: float = 0.95,
    ):
        if len(sizes) != 3 or min(sizes) < 0:
            raise UserError(f"synthetic sizes must be 3 non-negative counts (train,val,test), got {sizes}")
        if image_size < 16:
            raise UserError(f"synthetic image size must be at least 16 pixels, got {image_size}")
        if not 0.0 <= correlation <= 1.0:
            raise UserError(f"synthetic correlation must lie in [0, 1], got {correlation}")
        self.seed = seed
        self.sizes = dict(zip(SPLITS, sizes))
        self.image_size = image_size
        self.default_size = image_size
        self.correlation = correlation

    def describe(self) -> dict:
        return {
            "dataset": self.name,
            "seed": self.seed,
            "sizes": self.sizes,
            "image_size": self.image_size,
            "correlation": self.correlation,
        }

    def count(self, split: str) -> int:
        return self.sizes[split]

    def records(self, split: str) -> Iterator[Record]:
        for index in range(self.sizes[split]):
            yield self.make_record(split, index)

    def make_record(self, split: str, index: int) -> Record:
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[split], index])
        label, place = self._label_and_place(split, index, rng)
        image = _background(place, self.image_size, rng)
        box, mask = _draw_object(image, label, rng)
        return Record(
            key=f"{split}_{index:07d}",
            image=image,
            label=label,
            boxes=[box],
            mask=mask,
            group=f"{CLASSES[label]}/{PLACES[place]}",
            split=split,
            attrs={"place": PLACES[place]},
            source=f"synthetic(seed={self.seed}):{split}/{index}",
        )

    def _label_and_place(self, split: str, index: int, rng: np.random.Generator) -> tuple[int, int]:
        if split == "train":
            label = index % 2
            agrees = rng.random() < self.correlation
            return label, label if agrees else 1 - label
        group = index % 4  # balanced: every (label, place) pair equally often
        return group // 2, group % 2


def _background(place: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Land: mottled green-brown blobs. Water: blue with horizontal waves. Both vary per image."""
    yy = np.arange(size, dtype=np.float32)[:, None, None]
    noise = rng.normal(0.0, 8.0, (size, size, 3)).astype(np.float32)
    if PLACES[place] == "land":
        base = np.array([95, 115, 55], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        coarse = rng.normal(0.0, 22.0, (size // 8 + 1, size // 8 + 1, 1)).astype(np.float32)
        blobs = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:size, :size]
        image = base + blobs + noise
    else:
        base = np.array([45, 95, 165], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        period = rng.uniform(5.0, 10.0)
        waves = 25.0 * np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi))
        image = base + waves * np.array([0.4, 0.7, 1.0], np.float32) + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_object(image: np.ndarray, label: int, rng: np.random.Generator):
    """Paint a disk (label 0) or a ring (label 1) of a random colour; return its box and mask."""
    size = image.shape[0]
    side = int(rng.integers(int(0.3 * size), int(0.45 * size) + 1))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    radius = side / 2
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    distance2 = (xx - (x0 + radius)) ** 2 + (yy - (y0 + radius)) ** 2
    inside = distance2 <= radius**2
    if CLASSES[label] == "ring":
        inside &= distance2 >= (RING_INNER * radius) ** 2
    mask = np.where(inside, 255, 0).astype(np.uint8)
    image[inside] = rng.integers(0, 256, 3)
    return (float(x0), float(y0), float(x0 + side), float(y0 + side)), mask
