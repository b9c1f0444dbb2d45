"""The built-in datasets: shapes whose background agrees with the label in most training images.

One member of the benchmark family per `variant` (synthetic_variants.py), each with an uncorrelated twin.
"""

from __future__ import annotations

from typing import Iterator

import zlib

import numpy as np

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.datasets.synthetic_shapes import draw_object
from cfrobust.datasets.synthetic_textures import background, gaussian_blur
from cfrobust.datasets.synthetic_variants import DEFAULT_VARIANT, VARIANT_NAMES, VARIANTS, Variant
from cfrobust.errors import UserError

CLASSES = ["disk", "ring"]
PLACES = ["land", "water"]  # place p "agrees" with label y when p == y
SPLITS = ["train", "val", "test"]
RING_INNER = 0.5  # inner radius of a ring, as a fraction of its outer radius
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# Random streams of a family record (the default member keeps its original single stream).
_OBJECT_STREAM, _BACKGROUND_STREAM, _PLACE_STREAM, _TWIN_PLACE_STREAM = 1, 2, 3, 4


class SyntheticDataset(DatasetSource):
    """The label is the object's shape. In training the background's place agrees with it in
    `correlation` of the images, so a classifier can shortcut through the background; val and test
    hold every (class, place) group equally often. `twin=True` keeps every object and draws each
    training place independently of the label; val and test are the same as without it. Every
    record is a pure function of (seed, variant, twin, split, index)."""

    name = "synthetic"
    classes = CLASSES
    splits = SPLITS
    aligned_groups = [f"{CLASSES[i]}/{PLACES[i]}" for i in range(2)]

    def __init__(
        self,
        seed: int = 0,
        sizes: tuple[int, int, int] = (2000, 400, 800),
        image_size: int = 64,
        correlation: float | None = None,
        variant: str = DEFAULT_VARIANT,
        twin: bool = False,
    ):
        if variant not in VARIANTS:
            raise UserError(f"unknown synthetic variant {variant!r}; choose one of {', '.join(VARIANT_NAMES)}")
        self.variant = VARIANTS[variant]
        correlation = self.variant.correlation if correlation is None else correlation
        _check_options(seed, sizes, image_size, correlation, self.variant)
        self.seed = seed
        self.sizes = dict(zip(SPLITS, sizes))
        self.image_size = image_size
        self.default_size = image_size
        self.sized_by_default = True
        self.mixed_order = True  # labels alternate (train) or cycle through the groups (val, test) by index
        self.correlation = correlation
        self.twin = twin
        self.classes = self.variant.class_names
        self.places = list(self.variant.places)
        self.aligned_groups = [f"{c}/{p}" for c, p in zip(self.classes, self.places)]

    def describe(self) -> dict:
        variant = {"variant": self.variant.name, "twin": self.twin}
        # The original task's manifests stay as they were: no variant recorded means `default`.
        plain = self.variant.name == DEFAULT_VARIANT and not self.twin
        return {
            "dataset": self.name,
            **({} if plain else variant),
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
        if self.variant.name != DEFAULT_VARIANT:
            return self._family_record(split, index)
        record = self._default_record(split, index)
        if self.twin and split == "train":
            self._move_to_twin_place(record, index)
        return record

    def _default_record(self, split: str, index: int) -> Record:
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
            source=f"synthetic(seed={self.seed}{', twin' if self.twin else ''}):{split}/{index}",
        )

    def _label_and_place(self, split: str, index: int, rng: np.random.Generator) -> tuple[int, int]:
        if split == "train":
            label = index % 2
            agrees = rng.random() < self.correlation
            return label, label if agrees else 1 - label
        group = index % 4  # balanced: every (label, place) pair equally often
        return group // 2, group % 2

    def _move_to_twin_place(self, record: Record, index: int) -> None:
        """The default member's twin: the record's own object over a background of a uniformly
        drawn place (the default member draws its object after its background from one stream,
        so the object is lifted from the correlated record rather than redrawn)."""
        rng = self._stream("train", index, _TWIN_PLACE_STREAM)
        place = int(rng.integers(len(PLACES)))
        image = _background(place, self.image_size, rng)
        inside = record.mask > 0
        image[inside] = record.image[inside]
        record.image = image
        record.group = f"{CLASSES[record.label]}/{PLACES[place]}"
        record.attrs = {"place": PLACES[place]}

    def _family_record(self, split: str, index: int) -> Record:
        label, place = self._family_label_and_place(split, index)
        variant = self.variant
        # Objects come from a stream the place never touches: the twin redraws only the place.
        object_rng = self._stream(split, index, _OBJECT_STREAM)
        shapes = variant.classes[label][1]
        layer = draw_object(object_rng, shapes, variant.size_range, variant.centred, self.image_size)
        image, texture = background(self._stream(split, index, _BACKGROUND_STREAM), self.places[place], self.image_size)
        layer.paint(image)
        return Record(
            key=f"{split}_{index:07d}",
            image=self._degraded(image, object_rng),
            label=label,
            boxes=[layer.box],
            mask=np.where(layer.mask, 255, 0).astype(np.uint8),
            group=f"{self.classes[label]}/{self.places[place]}",
            split=split,
            attrs={"place": self.places[place], "shape": layer.shape, "texture": texture},
            source=f"synthetic(seed={self.seed}, variant={variant.name}{', twin' if self.twin else ''}):{split}/{index}",
        )

    def _family_label_and_place(self, split: str, index: int) -> tuple[int, int]:
        count = len(self.classes)
        if split != "train":
            return divmod(index % (count * count), count)  # balanced: every group equally often
        label = index % count
        if self.twin:
            return label, int(self._stream(split, index, _TWIN_PLACE_STREAM).integers(count))
        rng = self._stream(split, index, _PLACE_STREAM)
        if rng.random() < self.correlation:
            return label, label
        return label, (label + 1 + int(rng.integers(count - 1))) % count  # one of the other places

    def _degraded(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Camera blur, then sensor noise (drawn from the object's stream, so the twin shares it)."""
        if not (self.variant.blur_sigma or self.variant.noise_sigma):
            return image
        blurred = gaussian_blur(image, self.variant.blur_sigma)
        noisy = blurred + rng.normal(0.0, self.variant.noise_sigma, image.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    def _stream(self, split: str, index: int, stream: int) -> np.random.Generator:
        """An independent random stream per record and purpose, distinct for every member."""
        member = zlib.crc32(self.variant.name.encode())
        return np.random.default_rng([self.seed, _SPLIT_IDS[split], index, stream, member])


def _check_options(seed, sizes, image_size: int, correlation: float, variant: Variant) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    if len(sizes) != 3 or min(sizes) < 0:
        raise UserError(f"synthetic sizes must be 3 non-negative counts (train,val,test), got {sizes}")
    if image_size < variant.min_image_size:
        raise UserError(f"synthetic image size must be at least {variant.min_image_size} pixels, got {image_size}"
                        + ("" if variant.name == DEFAULT_VARIANT else f" (variant {variant.name})"))
    if not 0.0 <= correlation <= 1.0:
        raise UserError(f"synthetic correlation must lie in [0, 1], got {correlation}")


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
