"""The Record every dataset adapter yields, and the interface adapters implement."""

from __future__ import annotations

import re
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
    boxes: list[Box] = field(default_factory=list)  # empty + a mask: one box around the mask
    mask: Union[str, Path, np.ndarray, None] = None  # foreground = nonzero, same size as the image
    boxes_size: tuple[int, int] | None = None  # (width, height) the boxes are given in, if not the image's
    group: str = ""
    split: str = "train"
    attrs: dict = field(default_factory=dict)
    source: str = ""  # human-readable origin (file path, CSV line), used in error messages
    problem: str = ""  # set by an adapter that found the record unusable; preprocess reports it


def safe_key(text: str) -> str:
    """A shard key from a path or id: the file extension dropped, then every run of characters
    other than letters, digits, '-' and '_' replaced by '_' (tar members split at the first '.')."""
    head, _, last = text.rpartition("/")
    if "." in last:
        last = last.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{head}/{last}" if head else last).strip("_") or "_"


class DatasetSource:
    """What an adapter offers: class names, split names, and the records of each split."""

    name: str = ""
    classes: list[str] = []
    splits: list[str] = []
    default_size: int = 256  # stored image side when `preprocess --size` is not given
    sized_by_default: bool = False  # every image is default_size on a side: no need to look (synthetic)
    mixed_order: bool = False  # records() already interleaves the classes: preprocess keeps the order (synthetic)
    aligned_groups: list[str] = []  # groups whose spurious attribute agrees with the label, if known

    def records(self, split: str) -> Iterator[Record]:
        raise NotImplementedError

    def count(self, split: str) -> int | None:
        """Number of records in a split when known up front (for progress bars)."""
        return None

    def describe(self) -> dict:
        """JSON-able description of where the data came from (goes into `_info.json`)."""
        return {"dataset": self.name}

    def notes(self) -> list[str]:
        """What the user should know about the source beyond the skipped records (files left
        out on purpose, say); printed after the summary."""
        return []
