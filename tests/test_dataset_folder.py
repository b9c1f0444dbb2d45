"""The folder adapter: root/<split>/<class>/<image> + a boxes CSV; split order, labels, boxes after
resize, and every bad CSV line reported with its file and line number."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cfrobust.datasets.folder import FolderDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.schema import boxes_to_mask

SIZE = 16  # 24x20 sources scale by (2/3, 4/5): object edges on multiples of (3, 5) stay sharp


def draw(path, boxes):
    image = np.full((20, 24, 3), 30, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


CSV = """path,x0,y0,x1,y1
train/cat/001.png,0,0,6,5
train/dog/001.png,3,5,12,15
train/cat/001.png,15,10,24,20
val/cat/003.png,3,5,twelve,15
train/cat/missing.png,1,1,5,5
val/cat/003.png,3,5,12
elsewhere/x.png,1,1,5,5
"""


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    draw(root / "train" / "cat" / "001.png", [(0, 0, 6, 5), (15, 10, 24, 20)])
    draw(root / "train" / "cat" / "002.png", [(3, 5, 12, 15)])
    draw(root / "train" / "dog" / "001.png", [(3, 5, 12, 15)])
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    draw(root / "test" / "unsorted.png", [])  # no class folder: not a record, counted as ignored
    draw(root / "val" / "cat" / "003.png", [(3, 5, 12, 15)])
    draw(root / "val" / "bird" / "a b.png", [(3, 5, 12, 15)])  # bird exists in val only
    draw(root / "test" / "dog" / "004.png", [(3, 5, 12, 15)])
    draw(root / "holdout" / "cat" / "005.png", [(3, 5, 12, 15)])
    draw(root / "extra" / "loose.png", [])  # no class folders inside: not a split
    (tmp_path / "boxes.csv").write_text(CSV)
    return root


def open_folder(root):
    return FolderDataset(root, boxes_csv=root.parent / "boxes.csv")


def read_split(out, split):
    samples = list(iter_samples(sorted((out / split).glob("*.tar")), ["tile"]))
    return {s["key"]: s for s in samples}, json.loads((out / split / "_info.json").read_text())


def test_splits_classes_counts(root):
    ds = open_folder(root)
    assert ds.name == "folder"
    assert ds.splits == ["train", "val", "test", "holdout"]
    assert ds.classes == ["bird", "cat", "dog"]
    # train: 3 images + 2 CSV paths naming no image (train/cat/missing.png, elsewhere/x.png)
    assert [ds.count(s) for s in ds.splits] == [5, 2, 1, 1]
    assert [len(list(ds.records(s))) for s in ds.splits] == [5, 2, 1, 1]
    assert ds.describe() == {"dataset": "folder", "root": str(root), "boxes_csv": str(root.parent / "boxes.csv"),
                             "ignored_files": 2}
    assert ds.notes() == [f"2 file(s) under {root} left out: not a .bmp/.jpeg/.jpg/.pgm/.png/.ppm/.tif/.tiff/.webp "
                          f"image inside a class folder (train/dog/notes.txt, test/unsorted.png)"]


def test_records_without_csv(root):
    ds = FolderDataset(root)
    records = list(ds.records("train"))
    assert [(r.key, r.label, r.group, r.boxes) for r in records] == [
        ("train_cat_001", 1, "cat", []), ("train_cat_002", 1, "cat", []), ("train_dog_001", 2, "dog", [])]
    assert records[0].image == root / "train" / "cat" / "001.png"
    assert records[0].source == str(root / "train" / "cat" / "001.png")
    assert [(r.key, r.label) for r in ds.records("val")] == [("val_bird_a_b", 0), ("val_cat_003", 1)]


def test_preprocess_places_csv_boxes_on_the_objects(root, tmp_path):
    out = tmp_path / "out"
    summaries = preprocess(open_folder(root), out, ["tile"], size=SIZE, progress=False)
    assert [(s.split, s.written, len(s.skipped)) for s in summaries] == [
        ("train", 3, 2), ("val", 1, 1), ("test", 1, 0), ("holdout", 1, 0)]
    samples, info = read_split(out, "train")
    assert info["classes"] == ["bird", "cat", "dog"]
    assert info["group_counts"] == {"cat": 2, "dog": 1}
    expected = {"train_cat_001": [(0, 0, 4, 4), (10, 8, 16, 16)], "train_dog_001": [(2, 4, 8, 12)]}
    for key, boxes in expected.items():
        assert np.allclose(samples[key]["boxes"], boxes, atol=1e-3), key
        bright = samples[key]["image"].mean(axis=2) > 128
        assert np.array_equal(bright, boxes_to_mask(boxes, SIZE, SIZE)), key
    assert samples["train_cat_002"]["boxes"] == []  # not in the CSV: no box, kept
    labels_groups = [(samples[k]["label"], samples[k]["group"]) for k in sorted(samples)]
    assert labels_groups == [(1, "cat"), (1, "cat"), (2, "dog")]
    val, _ = read_split(out, "val")
    assert [(k, s["label"], s["group"]) for k, s in val.items()] == [("val_bird_a_b", 0, "bird")]


def test_bad_csv_lines_are_reported_with_file_and_line(root, tmp_path):
    summaries = preprocess(open_folder(root), tmp_path / "out", ["tile"], size=SIZE, progress=False)
    csv_path = str(root.parent / "boxes.csv")
    not_listed = f"which is not an image in a <split>/<class>/ folder of {root}"
    assert summaries[0].skipped == [
        {"key": "csv_elsewhere_x", "source": f"{csv_path}:8", "reason": f"CSV row names elsewhere/x.png, {not_listed}"},
        {"key": "csv_train_cat_missing", "source": f"{csv_path}:6",
         "reason": f"CSV row names train/cat/missing.png, {not_listed}"},
    ]
    reason = "bad box row for val/cat/003.png: box ['3', '5', 'twelve', '15'] is not 4 numbers (and 1 more bad rows)"
    assert summaries[1].skipped == [{"key": "val_cat_003", "source": f"{csv_path}:5", "reason": reason}]


def test_strict_raises_on_the_first_bad_line(root, tmp_path):
    with pytest.raises(UserError, match=r"record csv_elsewhere_x \(.*boxes.csv:8\): CSV row names elsewhere/x.png"):
        preprocess(open_folder(root), tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


def test_csv_paths_are_compared_after_normalising(root, tmp_path):
    (tmp_path / "boxes.csv").write_text("\ufeffpath,x0,y0,x1,y1\n./train/dog/001.png,3,5,12,15\n\n")
    ds = open_folder(root)
    dog = [r for r in ds.records("train") if r.key == "train_dog_001"][0]
    assert (dog.boxes, dog.problem) == ([(3.0, 5.0, 12.0, 15.0)], "")
    assert ds.count("train") == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "absent", "absent: dataset folder not found"),
        (lambda root: root / "extra", r"no <split>/<class>/ folders"),
    ],
)
def test_unusable_roots_are_user_errors(root, make, message):
    with pytest.raises(UserError, match=message):
        FolderDataset(make(root))


def test_bad_csv_header_or_missing_csv_is_a_user_error(root, tmp_path):
    (tmp_path / "boxes.csv").write_text("file,x,y,w,h\n")
    with pytest.raises(UserError, match=r"boxes.csv: first line must be the header path,x0,y0,x1,y1"):
        open_folder(root)
    with pytest.raises(UserError, match="nope.csv: boxes CSV not found"):
        FolderDataset(root, boxes_csv=tmp_path / "nope.csv")
