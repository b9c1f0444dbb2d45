"""The built-in synthetic dataset: deterministic from its seed, balanced where promised, tight boxes."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from cfrobust.datasets import open_dataset
from cfrobust.datasets.synthetic import CLASSES, SyntheticDataset
from cfrobust.errors import UserError


def _same_record(a, b) -> None:
    assert a.key == b.key
    assert a.label == b.label
    assert a.boxes == b.boxes
    assert a.group == b.group
    assert a.attrs == b.attrs
    assert a.image.dtype == np.uint8 and np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)


def test_open_dataset_builds_the_synthetic_source():
    ds = open_dataset("synthetic", seed=3, sizes=(4, 8, 12), image_size=20)
    assert isinstance(ds, SyntheticDataset)
    assert ds.name == "synthetic"
    assert ds.classes == CLASSES
    assert len(CLASSES) == 2 and CLASSES[0] == "disk"
    assert ds.splits == ["train", "val", "test"]
    assert ds.default_size == 20
    assert [ds.count(s) for s in ds.splits] == [4, 8, 12]
    assert [len(list(ds.records(s))) for s in ds.splits] == [4, 8, 12]
    assert ds.describe() == {
        "dataset": "synthetic",
        "seed": 3,
        "sizes": {"train": 4, "val": 8, "test": 12},
        "image_size": 20,
        "correlation": 0.95,
    }


def test_unknown_dataset_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        open_dataset("nope")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sizes": (10, 10)}, "3 non-negative counts"),
        ({"sizes": (10, -1, 10)}, "3 non-negative counts"),
        ({"image_size": 15}, "at least 16 pixels, got 15"),
        ({"correlation": 1.01}, r"correlation must lie in \[0, 1\], got 1.01"),
        ({"correlation": -0.1}, r"correlation must lie in \[0, 1\], got -0.1"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        SyntheticDataset(**options)


def test_same_seed_gives_identical_records():
    a = SyntheticDataset(seed=5, sizes=(6, 4, 4), image_size=24)
    b = SyntheticDataset(seed=5, sizes=(6, 4, 4), image_size=24)
    for split in a.splits:
        for ra, rb in zip(a.records(split), b.records(split), strict=True):
            _same_record(ra, rb)
    # Twice from the same object too: nothing depends on iteration state.
    for ra, rb in zip(a.records("train"), a.records("train"), strict=True):
        _same_record(ra, rb)


def test_different_seed_gives_different_images():
    a = list(SyntheticDataset(seed=0, sizes=(6, 4, 4), image_size=24).records("train"))
    b = list(SyntheticDataset(seed=1, sizes=(6, 4, 4), image_size=24).records("train"))
    assert [r.key for r in a] == [r.key for r in b]
    for ra, rb in zip(a, b):
        assert not np.array_equal(ra.image, rb.image)


def test_splits_differ_from_each_other():
    ds = SyntheticDataset(seed=0, sizes=(4, 4, 4), image_size=24)
    val = list(ds.records("val"))
    test = list(ds.records("test"))
    for rv, rt in zip(val, test):
        assert not np.array_equal(rv.image, rt.image)


def test_record_i_does_not_depend_on_split_sizes():
    small = SyntheticDataset(seed=2, sizes=(5, 4, 3), image_size=24)
    large = SyntheticDataset(seed=2, sizes=(50, 21, 9), image_size=24)
    for split in small.splits:
        recs_small = list(small.records(split))
        recs_large = list(large.records(split))[: len(recs_small)]
        for ra, rb in zip(recs_small, recs_large, strict=True):
            _same_record(ra, rb)
        # make_record gives the same record as iteration.
        _same_record(recs_small[-1], large.make_record(split, len(recs_small) - 1))


@pytest.mark.parametrize("split, n", [("val", 12), ("test", 40)])
def test_eval_splits_have_exactly_balanced_groups(split, n):
    sizes = {"val": (0, n, 0), "test": (0, 0, n)}[split]
    ds = SyntheticDataset(seed=9, sizes=sizes, image_size=16)
    records = list(ds.records(split))
    assert len(records) == n
    counts = Counter(r.group for r in records)
    assert counts == {f"{c}/{p}": n // 4 for c in CLASSES for p in ("land", "water")}


@pytest.mark.parametrize("correlation", [0.95, 0.7])
def test_train_correlation_is_close_to_the_requested_one(correlation):
    n = 2000
    ds = SyntheticDataset(seed=11, sizes=(n, 0, 0), image_size=16, correlation=correlation)
    records = list(ds.records("train"))
    assert len(records) == n
    places = ["land", "water"]
    agree = sum(places.index(r.attrs["place"]) == r.label for r in records)
    # Binomial(n, correlation): allow 4 standard deviations.
    tolerance = 4 * math.sqrt(correlation * (1 - correlation) / n)
    assert abs(agree / n - correlation) <= tolerance
    # Both classes are present in training, in about equal numbers.
    ones = sum(r.label for r in records)
    assert abs(ones / n - 0.5) <= 4 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("correlation, agreeing", [(1.0, 200), (0.0, 0)])
def test_train_correlation_extremes_are_exact(correlation, agreeing):
    ds = SyntheticDataset(seed=1, sizes=(200, 0, 0), image_size=16, correlation=correlation)
    places = ["land", "water"]
    agree = sum(places.index(r.attrs["place"]) == r.label for r in ds.records("train"))
    assert agree == agreeing


def test_records_are_well_formed_with_tight_boxes():
    size = 32
    ds = SyntheticDataset(seed=4, sizes=(40, 8, 8), image_size=size)
    keys = set()
    for split in ds.splits:
        for index, r in enumerate(ds.records(split)):
            assert r.key == f"{split}_{index:07d}"
            assert "." not in r.key and "/" not in r.key
            keys.add(r.key)
            assert r.split == split
            assert r.label in (0, 1)
            assert r.attrs["place"] in ("land", "water")
            assert r.group == f"{CLASSES[r.label]}/{r.attrs['place']}"
            assert r.source  # names where the record came from
            assert r.image.shape == (size, size, 3) and r.image.dtype == np.uint8
            assert r.mask.shape == (size, size)
            assert set(np.unique(r.mask)) == {0, 255}
            # Box == the bounding box of the mask's nonzero pixels, exactly.
            assert len(r.boxes) == 1
            ys, xs = np.nonzero(r.mask)
            tight = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            assert tuple(r.boxes[0]) == tight
            x0, y0, x1, y1 = (int(v) for v in r.boxes[0])
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert x1 - x0 == y1 - y0  # square box around a disk or a square
            # The object is painted in one colour.
            assert len(np.unique(r.image[r.mask > 0], axis=0)) == 1
    assert len(keys) == 56


def test_label_is_the_shape():
    """Label 0 is a filled disk; label 1 is the other shape (a ring, or a square in older versions)."""
    ds = SyntheticDataset(seed=6, sizes=(30, 0, 0), image_size=32)
    seen = set()
    for r in ds.records("train"):
        x0, y0, x1, y1 = (int(v) for v in r.boxes[0])
        inside = r.mask[y0:y1, x0:x1] > 0
        centre = inside[(y1 - y0) // 2, (x1 - x0) // 2]
        corners = [inside[0, 0], inside[0, -1], inside[-1, 0], inside[-1, -1]]
        shape = CLASSES[r.label]
        if shape == "square":  # fills its box
            assert inside.all()
        elif shape == "disk":  # corners of the box are empty, the centre is full, ~pi/4 of the box
            assert centre and not any(corners)
            assert 0.70 < inside.mean() < 0.86
        elif shape == "ring":  # a disk with a hole in the middle
            assert not centre and not any(corners)
            assert 0.40 < inside.mean() < 0.70
        else:
            pytest.fail(f"unexpected class {shape!r}")
        seen.add(r.label)
    assert seen == {0, 1}


def test_place_decides_the_background_colour():
    """Land is green-brown (G > B), water is blue (B > R and B > G), outside the object."""
    ds = SyntheticDataset(seed=8, sizes=(0, 40, 0), image_size=32)
    for r in ds.records("val"):
        background = r.image[r.mask == 0].astype(float).mean(axis=0)
        red, green, blue = background
        if r.attrs["place"] == "land":
            assert green > blue
        else:
            assert blue > red and blue > green
