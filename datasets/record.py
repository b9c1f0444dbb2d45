"""The Record every dataset adapter yields, and the interface adapters implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), pixels, x1/y1 are the far edges
ImageSource = Union[str, Path, bytes, np.ndarray]  # path, encoded bytes, or HxWx3 uint8 RGB


@dataclass
class Record:
    """One labelled image and where its object is, in the pixels of the source image."""

    key: str
    image: ImageSource
    label: int
    boxes: list[Box] = field(default_factory=list)
    mask: Union[str, Path, np.ndarray, None] = None  # foreground = nonzero
    group: str = ""
    split: str = "train"
    attrs: dict = field(default_factory=dict)
    source: str = ""  # human-readable origin (file path, CSV line), used in error messages


class DatasetSource:
    """What an adapter offers: class names, split names, and the records of each split."""

    name: str = ""
    classes: list[str] = []
    splits: list[str] = []
    default_size: int = 256  # stored image side when `preprocess --size` is not given

    def records(self, split: str) -> Iterator[Record]:
        raise NotImplementedError

    def count(self, split: str) -> int | None:
        """Number of records in a split when known up front (for progress bars)."""
        return None

    def describe(self) -> dict:
        """JSON-able description of where the data came from (goes into `_info.json`)."""
        return {"dataset": self.name}
