"""Raw datasets -> iterators of `Record`: one module per source format, plus the built-in one.

`open_dataset(name, **options)` is the single entry point the preprocess pipeline uses.
"""

from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.errors import UserError

DATASET_NAMES = ("synthetic",)


def open_dataset(name: str, **options) -> DatasetSource:
    """Build the source named `name`; options are the adapter's keyword arguments."""
    if name == "synthetic":
        from cfrobust.datasets.synthetic import SyntheticDataset

        return SyntheticDataset(**options)
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


__all__ = ["DATASET_NAMES", "DatasetSource", "Record", "open_dataset"]
