"""bench/unseen_waterbirds.py, the hold-out set written without the built-in generator: seeded, its
twin keeps every object, its groups follow --corr, and the Waterbirds adapter reads it."""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from cfrobust.datasets import open_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "unseen_waterbirds.py"
SIZES = "40,8,8"


@pytest.fixture(scope="module")
def unseen():
    spec = importlib.util.spec_from_file_location("unseen_waterbirds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate(unseen, out: Path, *extra: str) -> Path:
    unseen.main(["--out", str(out), "--seed", "3", "--sizes", SIZES, "--corr", "0.9", *extra])
    return out


def metadata(root: Path) -> list[dict]:
    with (root / "metadata.csv").open() as handle:
        return list(csv.DictReader(handle))


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_the_same_bytes(unseen, tmp_path):
    first = generate(unseen, tmp_path / "a")
    second = generate(unseen, tmp_path / "b")
    assert files(first) == files(second)
    assert len(files(first)) == 2 * 56 + 1  # an image and a mask per sample, and metadata.csv


def test_train_groups_follow_the_correlation_and_the_twin_is_balanced(unseen, tmp_path):
    rows = metadata(generate(unseen, tmp_path / "data"))
    twin = metadata(generate(unseen, tmp_path / "twin", "--twin"))
    def groups(table, split):
        return Counter((row["y"], row["place"]) for row in table if row["split"] == split)
    # 20 images per class; round(0.9 * 20) = 18 on their own place.
    assert groups(rows, "0") == {("0", "0"): 18, ("0", "1"): 2, ("1", "0"): 2, ("1", "1"): 18}
    assert groups(twin, "0") == {("0", "0"): 10, ("0", "1"): 10, ("1", "0"): 10, ("1", "1"): 10}
    assert groups(rows, "2") == {("0", "0"): 2, ("0", "1"): 2, ("1", "0"): 2, ("1", "1"): 2}
    assert [row["y"] for row in rows] == [row["y"] for row in twin]


def test_the_twin_has_the_same_objects(unseen, tmp_path):
    data = generate(unseen, tmp_path / "data")
    twin = generate(unseen, tmp_path / "twin", "--twin")
    masks = {name: blob for name, blob in files(data).items() if name.startswith("segmentations")}
    assert masks == {name: blob for name, blob in files(twin).items() if name.startswith("segmentations")}
    moved = [row for row, other in zip(metadata(data), metadata(twin)) if row["place"] != other["place"]]
    assert len(moved) == 16  # per class, 18 agreeing images become 10


def test_the_waterbirds_adapter_reads_it_with_masks(unseen, tmp_path):
    root = generate(unseen, tmp_path / "data")
    dataset = open_dataset("waterbirds", root=str(root))
    records = list(dataset.records("train"))
    assert len(records) == 40
    # Each sample is located by its own segmentation, a box around the drawn object.
    assert all(Path(record.mask).parent.parent.name == "segmentations" for record in records)
    assert all(x1 > x0 and y1 > y0 for record in records for x0, y0, x1, y1 in record.boxes)
    assert {record.group for record in dataset.records("test")} == {
        "landbird/land", "landbird/water", "waterbird/land", "waterbird/water"}


def test_a_full_folder_is_refused_without_overwrite(unseen, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        generate(unseen, tmp_path)
    generate(unseen, tmp_path, "--overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep"
