"""The paper's data experiments on the training stream: a fixed fraction of the data, boxes
for only some images, and annotation noise. Every choice is a pure function of (seed, key), so
it is the same in every epoch, on every rank and after a resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def unit_hash(*parts) -> float:
    """A number in [0, 1) that depends only on `parts` (not on Python's per-process hash seed)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class DataExperiment:
    seed: int = 0
    data_ratio: float = 1.0  # share of the training samples kept
    box_fraction: float = 1.0  # share of the kept samples that keep their boxes
    bbox_noise: float = 0.0  # each box moves by this share of its largest possible offset

    @property
    def active(self) -> bool:
        return self.data_ratio < 1 or self.box_fraction < 1 or self.bbox_noise > 0

    def keeps(self, key: str) -> bool:
        return unit_hash(self.seed, "data", key) < self.data_ratio

    def apply(self, sample: dict) -> dict:
        """The sample with its boxes removed (plain ERM) or shifted, as the experiment says."""
        key, boxes = sample["key"], sample["boxes"]
        if boxes and unit_hash(self.seed, "boxes", key) >= self.box_fraction:
            return {**sample, "boxes": []}
        if boxes and self.bbox_noise > 0:
            height, width = sample["image"].shape[:2]
            boxes = [self._shift(box, width, height, key, i) for i, box in enumerate(boxes)]
            return {**sample, "boxes": boxes}
        return sample

    def _shift(self, box, width: int, height: int, key: str, index: int) -> list[float]:
        """Move the box along x and y, each towards a random side, by bbox_noise x the room there
        (the official robustness test: 1.0 pushes it against the image border)."""
        x0, y0, x1, y1 = box
        dx = self._offset(x0, width - x1, key, index, "x")
        dy = self._offset(y0, height - y1, key, index, "y")
        return [x0 + dx, y0 + dy, x1 + dx, y1 + dy]

    def _offset(self, room_before: float, room_after: float, key: str, index: int, axis: str) -> float:
        towards_end = unit_hash(self.seed, "noise", key, index, axis) < 0.5
        return self.bbox_noise * (room_after if towards_end else -room_before)
