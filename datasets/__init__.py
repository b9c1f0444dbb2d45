"""Raw datasets -> iterators of `Record`: one module per source format, plus the built-in one.

`open_dataset(name, **options)` is the single entry point the preprocess pipeline uses; each
adapter module is imported only when its dataset is asked for.
"""

from __future__ import annotations

import importlib

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.errors import UserError

# --dataset name -> (module, class, fixed keyword arguments)
ADAPTERS = {
    "synthetic": ("cfrobust.datasets.synthetic", "SyntheticDataset", {}),
    "waterbirds": ("cfrobust.datasets.waterbirds", "WaterbirdsDataset", {}),
    "in9": ("cfrobust.datasets.in9", "BackgroundsDataset", {"large": False}),
    "in9l": ("cfrobust.datasets.in9", "BackgroundsDataset", {"large": True}),
    "cct": ("cfrobust.datasets.cct", "CCTDataset", {}),
    "coco": ("cfrobust.datasets.coco", "CocoDataset", {}),
    "folder": ("cfrobust.datasets.folder", "FolderDataset", {}),
}
DATASET_NAMES = tuple(ADAPTERS)


def open_dataset(name: str, **options) -> DatasetSource:
    """Build the source named `name`; options are the adapter's keyword arguments."""
    if name not in ADAPTERS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    module, cls, fixed = ADAPTERS[name]
    return getattr(importlib.import_module(module), cls)(**fixed, **options)


__all__ = ["DATASET_NAMES", "DatasetSource", "Record", "open_dataset"]
