"""Caltech Camera Traps, ECCV'18 split ("Recognition in Terra Incognita"): COCO Camera Traps JSON.

One sample per (image, animal category) with that category's boxes, "empty" (category 30) dropped,
as the official code does; group = the camera location, for per-location and cis/trans accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

from cfrobust.datasets.coco import CocoDataset, ImageEntry
from cfrobust.datasets.record import Record
from cfrobust.errors import UserError

SPLITS = ["train", "cis_val", "trans_val", "cis_test", "trans_test"]
ANNOTATION_FOLDER = "eccv_18_annotation_files"
IMAGE_FOLDER = "eccv_18_all_images_sm"
EMPTY_CATEGORY = 30


def annotation_files(root: Path) -> dict[str, Path]:
    """Split -> its `<split>_annotations.json`, in the release's folder or directly in root."""
    found = {}
    for split in SPLITS:
        for folder in (root / ANNOTATION_FOLDER, root):
            path = folder / f"{split}_annotations.json"
            if path.is_file():
                found[split] = path
                break
    if "train" not in found:
        raise UserError(f"{root / ANNOTATION_FOLDER / 'train_annotations.json'} not found (nor in {root})")
    return found


class CCTDataset(CocoDataset):
    """Splits train, cis_val, trans_val, cis_test, trans_test (those whose file exists)."""

    name = "cct"
    bbox_required = False  # an animal annotation without a bbox: the image trains as plain ERM

    def __init__(self, root, images=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{self.root}: CCT root folder not found")
        super().__init__(Path(images) if images else self.root / IMAGE_FOLDER, annotation_files(self.root))

    def label_index(self) -> dict[int, int]:
        animals = [cid for cid in self.categories if cid != EMPTY_CATEGORY]
        return {cid: i for i, cid in enumerate(animals)}

    def label_categories(self, entry: ImageEntry) -> list[int]:
        return sorted({cid for cid, _ in entry.annotations} - {EMPTY_CATEGORY})

    def drop_image(self, entry: ImageEntry) -> bool:
        # Empty frames are no training samples in the ECCV'18 protocol; describe() counts them.
        categories = {cid for cid, _ in entry.annotations}
        return categories == {EMPTY_CATEGORY}

    def species_samples(self, entry: ImageEntry) -> list[tuple[str, ImageEntry]]:
        """(key suffix, entry) per sample of one image: the image itself, or, where it shows several
        animal categories, one entry per category holding only that category's annotations.

        The official loader groups the annotations by (image_id, category_id), one sample per group
        with the group's boxes (robust_cls_model arch/data/cct_datasets.py:48-56), then drops
        category 30 (:58-59); its samples come in (image, category id) order, as here.
        """
        species = [] if entry.problems else self.label_categories(entry)
        if len(species) < 2:
            return [("", entry)]
        # The key gets the category id, not its name: ids are distinct where names made safe may not be.
        return [(f"_category{cid}", replace(entry, annotations=[a for a in entry.annotations if a[0] == cid]))
                for cid in species]

    def count(self, split: str) -> int:
        parsed = self._splits[split]
        kept = [entry for entry in parsed.entries if not self._is_dropped(entry)]
        return sum(len(self.species_samples(entry)) for entry in kept) + len(parsed.orphans)

    def records(self, split: str) -> Iterator[Record]:
        parsed = self._splits[split]
        for entry in parsed.entries:
            if self._is_dropped(entry):
                continue
            for suffix, sample in self.species_samples(entry):
                record = self.make_record(split, sample)
                record.key += suffix
                yield record
        for image_id, names in parsed.orphans.items():
            yield self.orphan_record(split, parsed.path, image_id, names)

    def several_species(self) -> dict[str, int]:
        """Split -> images that became one sample per animal category."""
        return {split: sum(len(self.species_samples(entry)) > 1 for entry in parsed.entries
                           if not self._is_dropped(entry))
                for split, parsed in self._splits.items()}

    def group_of(self, entry: ImageEntry, class_name: str) -> tuple[str, str]:
        location = entry.info.get("location")
        if location is None or location == "":
            return "", "image has no 'location' (the evaluation group)"
        return str(location), ""

    def attrs_of(self, entry: ImageEntry) -> dict:
        return {"image_id": entry.image_id, "location": entry.info.get("location")}

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "empty_images_dropped": dict(self.dropped),
                "images_with_several_species": self.several_species()}

    def notes(self) -> list[str]:
        several = {split: n for split, n in self.several_species().items() if n}
        if not several:
            return []
        counts = ", ".join(f"{split} {n}" for split, n in several.items())
        return [f"images showing several animal categories ({counts}) became one sample per category, "
                "each with that category's boxes only (as the official code); keys end in _category<id>"]
