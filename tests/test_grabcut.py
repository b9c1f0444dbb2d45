"""Masks from boxes (preprocess --masks-from-boxes grabcut): the object cut out of its box, the
rectangles where GrabCut cannot cut, the same masks in any process, and a box-only dataset
(the family's COCO export) stored with masks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.datasets.export import export_dataset
from cfrobust.datasets.synthetic import SyntheticDataset
from cfrobust.errors import UserError
from cfrobust.preprocess.grabcut import grabcut_mask
from cfrobust.preprocess.pipeline import Job, check_same_job, preprocess
from cfrobust.shards.reader import decode_sample, iter_raw_samples
from cfrobust.shards.schema import boxes_to_mask

SIDE = 32


def stored(split_dir):
    """Every sample of a split, decoded, with its mask when the shards hold one."""
    raws = iter_raw_samples(sorted(split_dir.glob("*.tar")), ["tile"], masks=True)
    return [decode_sample(raw, ["tile"]) for raw in raws]


def disk_on_texture() -> tuple[np.ndarray, np.ndarray]:
    """A yellow disk (radius 9) on dark random texture, 48 x 48, and the disk's mask."""
    image = np.random.default_rng(0).integers(0, 80, (48, 48, 3)).astype(np.uint8)
    rows, cols = np.mgrid[:48, :48]
    disk = (rows - 24) ** 2 + (cols - 24) ** 2 <= 81
    image[disk] = (220, 200, 60)
    return image, disk


def test_grabcut_cuts_the_disk_out_of_its_box():
    image, disk = disk_on_texture()
    box = (12, 12, 36, 36)  # the disk fills 44% of it; the rest is texture
    assert np.array_equal(grabcut_mask(image, [box]), disk)


def test_grabcut_gives_the_same_mask_whatever_opencv_drew_before():
    image, _ = disk_on_texture()
    texture = image.copy()
    texture[20:28, 20:28] = (90, 60, 30)  # a faint object: GrabCut's colour models decide
    first = grabcut_mask(texture, [(14, 14, 34, 34)])
    cv2.randu(np.zeros((100, 100), np.float32), 0, 1)  # moves OpenCV's random generator on
    assert np.array_equal(grabcut_mask(texture, [(14, 14, 34, 34)]), first)


def test_the_rectangles_stand_where_grabcut_cannot_cut():
    image, _ = disk_on_texture()
    whole = grabcut_mask(image, [(0, 0, 48, 48)])  # no background to learn from
    assert whole.all()
    flat = np.full((32, 32, 3), 100, np.uint8)  # the object is the colour of its place
    assert np.array_equal(grabcut_mask(flat, [(8, 8, 24, 24)]), boxes_to_mask([(8, 8, 24, 24)], 32, 32))
    assert not grabcut_mask(image, []).any()


def _coco_export(tmp_path, name="large"):
    dataset = SyntheticDataset(seed=1, sizes=(12, 4, 4), image_size=SIDE, variant=name)
    export_dataset(dataset, tmp_path / "coco", "coco", "png", progress=False)
    files = {split: tmp_path / "coco" / "annotations" / f"{split}.json" for split in dataset.splits}
    return dataset, open_dataset("coco", images=tmp_path / "coco" / "images", annotations=files)


def test_a_box_only_dataset_is_stored_with_grabcut_masks(tmp_path):
    dataset, boxes_only = _coco_export(tmp_path)
    assert all(r.mask is None for r in boxes_only.records("train"))
    out = tmp_path / "shards"
    preprocess(boxes_only, out, ["tile"], progress=False, masks_from_boxes="grabcut")
    generated = {r.key: r.mask > 0 for r in dataset.records("train")}
    overlaps = []
    for sample in stored(out / "train"):
        mask, truth = sample["mask"], generated[sample["key"]]
        assert not (mask & ~boxes_to_mask(sample["boxes"], SIDE, SIDE)).any()  # never outside its box
        overlaps.append((mask & truth).sum() / (mask | truth).sum())
    assert len(overlaps) == 12 and np.mean(overlaps) > 0.9  # rectangles: about 0.6
    assert json.loads((out / "train" / "_info.json").read_text())["masks_from_boxes"] == "grabcut"
    # Without the option the shards hold no masks, and F and Sal use the rectangles.
    preprocess(boxes_only, tmp_path / "plain", ["tile"], progress=False)
    assert all("mask" not in sample for sample in stored(tmp_path / "plain" / "train"))


def test_grabcut_shards_are_the_same_for_any_worker_count(tmp_path):
    _, boxes_only = _coco_export(tmp_path, "four-class")
    for workers in (1, 2):
        preprocess(boxes_only, tmp_path / f"w{workers}", ["tile"], progress=False, workers=workers,
                   masks_from_boxes="grabcut")
    one, two = (sorted((tmp_path / f"w{w}" / "train").glob("*.tar")) for w in (1, 2))
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]


def test_a_journal_from_before_the_option_resumes_as_none(tmp_path):
    _, boxes_only = _coco_export(tmp_path)
    job = Job(boxes_only, tmp_path, ("tile",), SIDE, 100, False)
    older = {k: v for k, v in job.identity().items() if k != "masks_from_boxes"}
    check_same_job(job, older, tmp_path / "journal")  # the same job: no error
    with pytest.raises(UserError, match=r"made with other options \(masks_from_boxes\)"):
        check_same_job(Job(boxes_only, tmp_path, ("tile",), SIDE, 100, False, masks_from_boxes="grabcut"),
                       older, tmp_path / "journal")


def test_the_cli_passes_the_option_on_and_refuses_others(tmp_path):
    _coco_export(tmp_path)
    args = ["preprocess", "--dataset", "coco", "--images", str(tmp_path / "coco" / "images"),
            *[a for split in ("train", "val", "test")
              for a in ("--annotations", f"{split}={tmp_path / 'coco' / 'annotations' / f'{split}.json'}")]]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a"), "--masks-from-boxes", "grabcut"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "train" / "_info.json").read_text())["masks_from_boxes"] == "grabcut"
    wrong = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--masks-from-boxes", "sam"])
    assert wrong.exit_code == 2 and "'sam' is not one of 'none', 'grabcut'" in wrong.output
