"""The COCO adapter on a tiny COCO JSON: labels, classes, boxes after resize, every problem reported."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cfrobust.datasets.coco import CocoDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import iter_samples
from cfrobust.shards.schema import boxes_to_mask

SIZE = 16  # stored side; 24x20 sources scale by (2/3, 4/5), so edges on multiples of (3, 5) stay sharp


def draw(path, width, height, boxes):
    """A dark image with white rectangles (x0, y0, x1, y1) where the objects are."""
    image = np.full((height, width, 3), 30, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def bright_mask(image):
    return image.mean(axis=2) > 128


def read_split(out, split):
    samples = list(iter_samples(sorted((out / split).glob("*.tar")), ["tile"]))
    return {s["key"]: s for s in samples}, json.loads((out / split / "_info.json").read_text())


def ann(aid, image_id, category, bbox):
    return {"id": aid, "image_id": image_id, "category_id": category, "bbox": bbox, "area": 1, "iscrowd": 0}


def img(image_id, name, width=24, height=20):
    return {"id": image_id, "file_name": name, "width": width, "height": height}


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    draw(images / "a.png", 24, 20, [(3, 5, 12, 15)])
    draw(images / "sub" / "b.png", 24, 20, [(0, 0, 6, 5), (15, 10, 24, 20)])
    draw(images / "c.png", 24, 20, [(12, 5, 21, 20)])  # JSON states 48x40: boxes there are twice as large
    for name in ["d", "e", "f", "g", "h", "v"]:
        draw(images / f"{name}.png", 24, 20, [(3, 5, 12, 15)])
    train = {
        "info": {"description": "tiny"},
        "licenses": [],
        "categories": [{"id": 2, "name": "dog", "supercategory": "animal"}, {"id": 1, "name": "cat"}],
        "images": [
            img(1, "a.png"), img(2, "sub/b.png"), img(3, "c.png", 48, 40), img(4, "d.png"), img(5, "e.png"),
            img(6, "f.png"), img(7, "g.png"), img(8, "h.png"), img(8, "h.png"),
        ],
        "annotations": [
            ann(10, 1, 1, [3, 5, 9, 10]),
            ann(11, 2, 2, [0, 0, 6, 5]),
            ann(12, 2, 2, [15.0, 10.0, 9.0, 10.0]),
            ann(13, 3, 1, [24, 10, 18, 30]),
            ann(14, 4, 1, [3, 5, 9, 10]),
            ann(15, 4, 2, [3, 5, 9, 10]),  # image 4: two different categories
            # image 5 (e.png) has no annotation at all
            ann(16, 6, 1, [3, 5, 9]),  # bbox of 3 numbers
            ann(17, 7, 99, [3, 5, 9, 10]),  # unknown category
            ann(18, 8, 1, [3, 5, 9, 10]),  # image id 8 is listed twice
            ann(19, 999, 1, [3, 5, 9, 10]),  # no such image
        ],
    }
    val = {
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "bird"}],
        "images": [img(1, "v.png")],
        "annotations": [ann(1, 1, 3, [3, 5, 9, 10])],
    }
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    return tmp_path


def open_coco(root):
    return CocoDataset(root / "images", {"train": root / "train.json", "val": root / "val.json"})


def test_classes_splits_counts_and_description(coco):
    ds = open_coco(coco)
    assert ds.name == "coco"
    assert ds.classes == ["cat", "dog", "bird"]  # sorted by category id, union over both files
    assert ds.splits == ["train", "val"]
    assert ds.default_size == 256
    assert [ds.count(s) for s in ds.splits] == [10, 1]  # 9 image entries + 1 unknown-image annotation
    assert [len(list(ds.records(s))) for s in ds.splits] == [10, 1]
    assert ds.describe() == {
        "dataset": "coco",
        "images": str(coco / "images"),
        "annotations": {"train": str(coco / "train.json"), "val": str(coco / "val.json")},
    }


def test_records_merge_annotations_per_image(coco):
    records = {r.key: r for r in open_coco(coco).records("train")}
    a, b, c = records["a"], records["sub_b"], records["c"]
    assert (a.label, a.group, a.boxes, a.boxes_size) == (0, "cat", [(3.0, 5.0, 12.0, 15.0)], (24, 20))
    assert (b.label, b.group, b.boxes) == (1, "dog", [(0.0, 0.0, 6.0, 5.0), (15.0, 10.0, 24.0, 20.0)])
    assert (c.boxes, c.boxes_size) == ([(24.0, 10.0, 42.0, 40.0)], (48, 40))
    assert a.image == coco / "images" / "a.png" and b.image == coco / "images" / "sub" / "b.png"
    assert a.source == f"{coco / 'train.json'}: image id 1"
    assert a.attrs == {"image_id": 1}
    assert [r.key for r in open_coco(coco).records("train")][:4] == ["a", "c", "d", "e"]  # sorted by file name


def test_preprocess_places_boxes_on_the_objects(coco, tmp_path):
    out = tmp_path / "out"
    summaries = preprocess(open_coco(coco), out, ["tile"], size=SIZE, progress=False)
    assert [(s.split, s.written) for s in summaries] == [("train", 3), ("val", 1)]
    samples, info = read_split(out, "train")
    assert sorted(samples) == ["a", "c", "sub_b"]
    assert info["classes"] == ["cat", "dog", "bird"]
    assert info["group_counts"] == {"cat": 2, "dog": 1}
    expected = {
        "a": [(2, 4, 8, 12)],
        "sub_b": [(0, 0, 4, 4), (10, 8, 16, 16)],
        "c": [(8, 4, 14, 16)],  # the 48x40 annotation rescaled to the 24x20 file, then to 16x16
    }
    for key, boxes in expected.items():
        sample = samples[key]
        assert np.allclose(sample["boxes"], boxes, atol=1e-3), key
        assert np.array_equal(bright_mask(sample["image"]), boxes_to_mask(boxes, SIZE, SIZE)), key
    assert [samples[k]["label"] for k in ("a", "sub_b", "c")] == [0, 1, 0]
    val, val_info = read_split(out, "val")
    assert [(s["label"], s["group"]) for s in val.values()] == [(2, "bird")]
    assert val_info["skipped"] == []


def test_every_problem_is_reported_with_file_and_image_id(coco, tmp_path):
    summaries = preprocess(open_coco(coco), tmp_path / "out", ["tile"], size=SIZE, progress=False)
    where = str(coco / "train.json")
    assert summaries[0].skipped == [
        {"key": "d", "source": f"{where}: image id 4", "reason": "several categories: cat, dog"},
        {"key": "e", "source": f"{where}: image id 5", "reason": "no annotation"},
        {"key": "f", "source": f"{where}: image id 6",
         "reason": "annotation 16: bbox [3, 5, 9] is not 4 numbers [x, y, width, height]"},
        {"key": "g", "source": f"{where}: image id 7", "reason": "annotation 17: unknown category id 99"},
        {"key": "h", "source": f"{where}: image id 8", "reason": "image id 8 appears 2 times in 'images'"},
        {"key": "h", "source": f"{where}: image id 8", "reason": "image id 8 appears 2 times in 'images'"},
        {"key": "unknown_image_999_annotation_19", "source": f"{where}: image id 999",
         "reason": "image id 999 is not in 'images' (named by annotation 19)"},
    ]


def test_strict_stops_at_the_first_problem(coco, tmp_path):
    with pytest.raises(UserError, match=r"record d \(.*train.json: image id 4\): several categories: cat, dog"):
        preprocess(open_coco(coco), tmp_path / "out", ["tile"], size=SIZE, strict=True, progress=False)


def test_a_category_id_named_differently_in_two_files_is_a_user_error(coco):
    val = json.loads((coco / "val.json").read_text())
    val["categories"][0]["name"] = "kitten"
    (coco / "val.json").write_text(json.dumps(val))
    with pytest.raises(UserError, match=r"category id 1 is 'cat' in .*train.json but 'kitten' in .*val.json"):
        open_coco(coco)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"val.json: not valid JSON \(line 1"),
        ('{"images": [], "categories": []}', r"val.json: missing the 'annotations' list"),
        ('{"images": [], "annotations": [], "categories": [{"id": "1", "name": "x"}]}', "needs an integer 'id'"),
    ],
)
def test_malformed_files_are_user_errors(coco, content, message):
    (coco / "val.json").write_text(content)
    with pytest.raises(UserError, match=message):
        open_coco(coco)


def test_missing_inputs_are_user_errors(coco):
    with pytest.raises(UserError, match="nope.json: annotation file not found"):
        CocoDataset(coco / "images", {"train": coco / "nope.json"})
    with pytest.raises(UserError, match="pics: image folder not found"):
        CocoDataset(coco / "pics", {"train": coco / "train.json"})


def test_malformed_entries_become_reported_records(coco, tmp_path):
    where = coco / "odd.json"
    where.write_text(json.dumps({
        "categories": [{"id": 1, "name": "cat"}],
        "images": [{"file_name": "a.png", "width": 24, "height": 20}, img(2, "c.png", 0, 20), img(3, "d.png")],
        "annotations": [["not", "an", "object"], {"id": 5, "category_id": 1, "bbox": [3, 5, 9, 10]},
                        {"id": 6, "image_id": 3, "category_id": 1}],  # COCO requires a bbox
    }))
    records = list(CocoDataset(coco / "images", {"train": where}).records("train"))
    assert [(r.key, r.source.replace(str(where), "F"), r.problem) for r in records] == [
        ("a", "F: images[0]", "image entry needs a string or integer 'id'"),
        ("c", "F: image id 2", "width/height 0x20 are not two positive numbers"),
        ("d", "F: image id 3", "annotation 6: bbox None is not 4 numbers [x, y, width, height]"),
        ("no_image_id_annotations_0", "F: annotations[0]", "annotations[0] has no string or integer 'image_id'"),
        ("no_image_id_annotation_5", "F: annotation 5", "annotation 5 has no string or integer 'image_id'"),
    ]


def test_an_images_own_group_field_is_its_group(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(tmp_path / "img" / name), np.zeros((8, 8, 3), np.uint8))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8, "group": "cat/indoor"},
                   {"id": 2, "file_name": "b.png", "width": 8, "height": 8},
                   {"id": 3, "file_name": "c.png", "width": 8, "height": 8, "group": 7}],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 4, 4]} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "cat"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    records = list(CocoDataset(tmp_path / "img", {"train": tmp_path / "train.json"}).records("train"))
    assert [(r.group, r.problem) for r in records] == [("cat/indoor", ""), ("cat", ""), ("", "group 7 is not a non-empty string")]
