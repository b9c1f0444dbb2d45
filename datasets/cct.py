"""Caltech Camera Traps, ECCV'18 split ("Recognition in Terra Incognita"): COCO Camera Traps JSON.

Label = the image's animal category with "empty" (category 30) dropped as the official code does;
group = the camera location, so evaluation reports per-location and cis/trans accuracy.
"""

from __future__ import annotations

from pathlib import Path

from cfrobust.datasets.coco import CocoDataset, ImageEntry
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

    def group_of(self, entry: ImageEntry, class_name: str) -> tuple[str, str]:
        location = entry.info.get("location")
        if location is None or location == "":
            return "", "image has no 'location' (the evaluation group)"
        return str(location), ""

    def attrs_of(self, entry: ImageEntry) -> dict:
        return {"image_id": entry.image_id, "location": entry.info.get("location")}

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "empty_images_dropped": dict(self.dropped)}
