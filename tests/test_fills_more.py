"""The random, shuffle and OpenCV fills offline, the online (device) fills against the offline
ones, and training with each of them.

Hand-made images are 6 rows x 8 columns with a distinct value in every pixel and disjoint value
ranges per channel (0..47, 100..147, 153..200), so a value's origin is visible in the output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cfrobust.datasets import open_dataset
from cfrobust.errors import UserError
from cfrobust.preprocess.fills import (
    FILLS,
    fill_mean,
    fill_random,
    fill_shuffle,
    fill_tile,
    record_rng,
)
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.schema import MEAN_RGB_UINT8, NORMALIZE_MEAN, NORMALIZE_STD, boxes_to_mask
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.fills import ONLINE_FILLS
from cfrobust.trainer.pixels import normalize
from cfrobust.trainer.train import train

H, W = 6, 8
BORDER = [(0, 0, 3, 2)]
WHOLE = [(0, 0, W, H)]
TWO = [(0, 0, 2, 2), (5, 4, 8, 6)]
ONE_PIXEL = [(3, 2, 4, 3)]
CASES = {"border": BORDER, "whole": WHOLE, "two": TWO, "one-pixel": ONE_PIXEL}
NEW_FILLS = ["random", "shuffle", "telea", "ns"]
MEAN = torch.tensor(NORMALIZE_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(NORMALIZE_STD).view(1, 3, 1, 1)


def make_image(height: int = H, width: int = W) -> np.ndarray:
    flat = np.arange(height * width).reshape(height, width)
    return np.stack([flat, 100 + flat, 200 - flat], axis=-1).astype(np.uint8)


def hole_of(boxes, height: int = H, width: int = W) -> np.ndarray:
    return boxes_to_mask(boxes, width, height)


def run_fill(method: str, image: np.ndarray, boxes, seed: int = 0) -> np.ndarray:
    """Run an offline fill; the input stays untouched and pixels outside the hole unchanged."""
    before = image.copy()
    out = FILLS[method](image, boxes, rng=np.random.default_rng(seed))
    assert np.array_equal(image, before), "fill modified its input"
    assert out.shape == image.shape and out.dtype == np.uint8
    outside = ~hole_of(boxes, *image.shape[:2])
    assert np.array_equal(out[outside], image[outside])
    return out


def to_device(images: np.ndarray, box_lists) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] and per-image boxes -> normalised [B, 3, H, W] and holes [B, 1, H, W]."""
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    holes = np.stack([hole_of(b, *images.shape[1:3]) for b in box_lists])
    return x, torch.from_numpy(holes)[:, None]


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Normalised [B, 3, H, W] -> float [B, H, W, 3] in uint8 units."""
    return ((x * STD + MEAN) * 255).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- every new fill, every box case


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", NEW_FILLS)
def test_new_fills_change_only_the_hole(method, case):
    run_fill(method, make_image(), CASES[case])


@pytest.mark.parametrize("method", NEW_FILLS)
def test_new_fills_without_boxes_change_nothing(method):
    image = make_image()
    out = FILLS[method](image, [], rng=np.random.default_rng(0))
    assert np.array_equal(out, image) and out is not image


def test_deterministic_fills_accept_and_ignore_rng():
    image = make_image()
    for method in ("mean", "tile", "telea", "ns"):
        a = FILLS[method](image, TWO, rng=np.random.default_rng(1))
        b = FILLS[method](image, TWO, rng=np.random.default_rng(2))
        assert np.array_equal(a, b) and np.array_equal(a, FILLS[method](image, TWO)), method


# ---------------------------------------------------------------- record_rng


def test_record_rng_is_pinned_across_processes_and_versions():
    # Shards made earlier must stay reproducible: these draws may never change.
    assert record_rng("train-000001", "random").integers(0, 2**32, size=2).tolist() == [3079934604, 3343600390]


def test_record_rng_depends_on_key_and_method():
    draw = lambda key, method: record_rng(key, method).integers(0, 2**62)  # noqa: E731
    assert draw("a", "random") == draw("a", "random")
    assert len({draw("a", "random"), draw("b", "random"), draw("a", "shuffle"), draw("ab", "")}) == 4


# ---------------------------------------------------------------- random


@pytest.mark.parametrize("case", CASES)
def test_random_is_deterministic_per_rng_and_differs_between_keys(case):
    boxes, image = CASES[case], make_image()
    same = [fill_random(image, boxes, rng=record_rng("k1", "random")) for _ in range(2)]
    other = fill_random(image, boxes, rng=record_rng("k2", "random"))
    assert np.array_equal(same[0], same[1])
    hole = hole_of(boxes)
    assert not np.array_equal(same[0][hole], other[hole])
    assert not np.array_equal(same[0][hole], image[hole])


def test_random_hole_does_not_depend_on_the_image():
    hole = hole_of(TWO)
    a = fill_random(make_image(), TWO, rng=np.random.default_rng(5))
    b = fill_random(np.zeros((H, W, 3), np.uint8), TWO, rng=np.random.default_rng(5))
    assert np.array_equal(a[hole], b[hole])


def random_statistics(pixels: np.ndarray) -> tuple[float, float, float]:
    """[N, P, 3] hole pixels of N images -> (mean and spread across images of each image's
    per-channel hole mean, median per-channel spread inside one image)."""
    per_image = pixels.mean(axis=1)
    within = pixels.std(axis=1)
    return float(per_image.mean()), float(per_image.std()), float(np.median(within))


def test_random_online_and_offline_draw_the_same_distribution():
    # 200 images, hole = whole 16x16 image. Per image and channel a colour ~ U(0, 255) and
    # noise N(0, 51) clamped to [0, 255]: the hole means spread ~U(0, 255) (mean 127.5,
    # std ~70 after clamping), the spread inside an image is ~51 less the clamping.
    n, size = 200, 16
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    boxes = [(0, 0, size, size)]
    offline = np.stack([fill_random(im, boxes, rng=record_rng(f"img{i}", "random")) for i, im in enumerate(images)])
    x, holes = to_device(images, [boxes] * n)
    online = to_pixels(ONLINE_FILLS["random"](x, holes, torch.Generator().manual_seed(0)))
    assert np.abs(online - online.round()).max() < 1e-3  # drawn in uint8 units, rounded like offline
    assert online.min() > -1e-3 and online.max() < 255 + 1e-3
    off = random_statistics(offline.reshape(n, -1, 3).astype(float))
    on = random_statistics(online.reshape(n, -1, 3))
    for stats in (off, on):
        assert abs(stats[0] - 127.5) < 10 and 60 < stats[1] < 80 and 40 < stats[2] < 52
    assert abs(off[0] - on[0]) < 12 and abs(off[1] - on[1]) < 8 and abs(off[2] - on[2]) < 3


def test_online_random_changes_only_the_hole_and_differs_per_image():
    images = np.stack([make_image()] * 3)
    x, holes = to_device(images, [BORDER, TWO, ONE_PIXEL])
    out = ONLINE_FILLS["random"](x, holes, torch.Generator().manual_seed(0))
    assert torch.equal(out[~holes.expand_as(x)], x[~holes.expand_as(x)])
    filled = out[0, :, 0:2, 0:3]
    assert not torch.equal(filled, x[0, :, 0:2, 0:3])
    again = ONLINE_FILLS["random"](x, holes, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator alone decides the draws


# ---------------------------------------------------------------- shuffle


def test_shuffle_of_the_whole_image_permutes_all_its_values():
    image = make_image()
    out = run_fill("shuffle", image, WHOLE, seed=3)
    assert np.array_equal(np.sort(out, axis=None), np.sort(image, axis=None))
    assert not np.array_equal(out, image)


@pytest.mark.parametrize("case", ["border", "two", "one-pixel"])
def test_shuffle_hole_takes_values_of_the_image_without_replacement(case):
    image, boxes = make_image(), CASES[case]
    hole = hole_of(boxes)
    values, counts = np.unique(image, return_counts=True)
    available = dict(zip(values.tolist(), counts.tolist()))
    for seed in range(20):
        out = run_fill("shuffle", image, boxes, seed=seed)
        taken, times = np.unique(out[hole], return_counts=True)
        assert all(available.get(v, 0) >= t for v, t in zip(taken.tolist(), times.tolist()))


def test_shuffle_mixes_channels_as_the_official_code():
    # The official ShuffleInpainter permutes "all the values including channels": about a
    # third of the red values in the hole come from each channel's value range.
    image, hole = make_image(), hole_of(BORDER)
    red = np.concatenate([fill_shuffle(image, BORDER, rng=np.random.default_rng(s))[hole][:, 0] for s in range(200)])
    fractions = [np.mean(red < 100), np.mean((red >= 100) & (red < 150)), np.mean(red > 150)]
    assert all(abs(f - 1 / 3) < 0.05 for f in fractions), fractions


def test_shuffle_is_deterministic_per_rng_and_differs_between_keys():
    image = make_image()
    a, b = (fill_shuffle(image, TWO, rng=record_rng("k1", "shuffle")) for _ in range(2))
    c = fill_shuffle(image, TWO, rng=record_rng("k2", "shuffle"))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_online_shuffle_of_whole_images_permutes_each_image_on_its_own():
    # Two images with disjoint values: the permutation must not mix them (offline cannot).
    images = np.stack([make_image(), 255 - make_image()])
    x, holes = to_device(images, [WHOLE, WHOLE])
    out = to_pixels(ONLINE_FILLS["shuffle"](x, holes, torch.Generator().manual_seed(0)))
    for i in range(2):
        np.testing.assert_allclose(np.sort(out[i], axis=None), np.sort(images[i], axis=None), atol=1e-3)
        assert np.abs(out[i] - images[i]).max() > 1  # actually moved
    offline = run_fill("shuffle", images[0], WHOLE)
    np.testing.assert_allclose(np.sort(out[0], axis=None), np.sort(offline, axis=None), atol=1e-3)


def test_online_and_offline_shuffle_draw_the_same_distribution():
    # Where the hole's red values come from (each channel's value range), and their mean.
    n = 200
    image, hole = make_image(), hole_of(BORDER)
    offline = np.stack([fill_shuffle(image, BORDER, rng=record_rng(f"img{i}", "shuffle"))[hole] for i in range(n)])
    x, holes = to_device(np.stack([image] * n), [BORDER] * n)
    out = ONLINE_FILLS["shuffle"](x, holes, torch.Generator().manual_seed(0))
    assert torch.equal(out[~holes.expand_as(x)], x[~holes.expand_as(x)])
    online = to_pixels(out)[:, hole]
    for values in (offline.astype(float), online):
        red = values[..., 0]
        fractions = [np.mean(red < 99.5), np.mean((red > 99.5) & (red < 150)), np.mean(red > 150)]
        assert all(abs(f - 1 / 3) < 0.05 for f in fractions), fractions
        assert abs(values.mean() - image.mean()) < 4
    assert abs(offline.mean() - online.mean()) < 4


# ---------------------------------------------------------------- telea / ns


FLAT = (77, 130, 200)


@pytest.mark.parametrize("case", ["border", "two", "one-pixel"])
@pytest.mark.parametrize("method", ["telea", "ns"])
def test_opencv_fills_continue_a_flat_background(method, case):
    boxes = CASES[case]
    hole = hole_of(boxes)
    image = np.empty((H, W, 3), np.uint8)
    image[:] = FLAT
    image[hole] = (255, 0, 0)  # the object, which must vanish
    out = run_fill(method, image, boxes)
    assert np.abs(out[hole].astype(int) - FLAT).max() <= 2


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_opencv_fills_of_the_whole_image_fall_back_to_mean(method):
    # Nothing outside the hole to inpaint from (cv2.inpaint would return the object unchanged).
    out = run_fill(method, make_image(), WHOLE)
    assert (out == np.array(MEAN_RGB_UINT8, np.uint8)).all()


# ---------------------------------------------------------------- mean / tile: online == offline


@pytest.mark.parametrize("case", CASES)
def test_online_mean_and_tile_match_offline(case):
    boxes, image = CASES[case], make_image()
    x, holes = to_device(image[None], [boxes])
    mean_out = ONLINE_FILLS["mean"](x, holes, None)
    assert (mean_out[holes.expand_as(x)] == 0).all()
    offline_mean = normalize(torch.from_numpy(fill_mean(image, boxes)).permute(2, 0, 1)[None])
    # The offline fill is the uint8 colour nearest the mean: within half a grey level of 0.
    assert ((mean_out - offline_mean).abs() <= 0.5 / 255 / STD + 1e-6).all()
    tile_out = ONLINE_FILLS["tile"](x, holes, None)
    offline_tile = normalize(torch.from_numpy(fill_tile(image, boxes)).permute(2, 0, 1)[None])
    if case == "whole":  # no band and nothing outside: 0 online, its uint8 rounding offline
        assert (tile_out == 0).all()
        assert ((tile_out - offline_tile).abs() <= 0.5 / 255 / STD + 1e-6).all()
    else:
        assert (tile_out - offline_tile).abs().max() < 1e-5


def test_online_fills_registry():
    assert set(ONLINE_FILLS) == {"mean", "random", "shuffle", "tile"}


# ---------------------------------------------------------------- training with every fill


def tiny_dataset():
    return open_dataset("synthetic", sizes=(32, 16, 16), image_size=16)


@pytest.fixture(scope="module")
def plain_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "shards"
    preprocess(tiny_dataset(), out, [], shard_size=8, progress=False)
    return out


@pytest.fixture(scope="module")
def filled_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("filled") / "shards"
    preprocess(tiny_dataset(), out, NEW_FILLS, shard_size=8, progress=False)
    return out


def train_two_steps(shards: Path, out: Path, cf: str, cf_online: bool) -> dict:
    config = TrainConfig(
        shards=str(shards), out=str(out), arch="simple-cnn", epochs=1, batch=16, workers=0, device="cpu",
        cf=cf, cf_online=cf_online,
    )
    train(config)
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["step"] == 2  # 32 training images / batch 16
    assert set(record["terms"]) == {"ce", "cf"}
    assert all(math.isfinite(v) for v in record["terms"].values()) and record["terms"]["cf"] > 0
    return record


@pytest.mark.parametrize("method", sorted(ONLINE_FILLS))
def test_online_fills_train_on_shards_without_counterfactuals(plain_shards, tmp_path, method):
    train_two_steps(plain_shards, tmp_path / "run", method, cf_online=True)


@pytest.mark.parametrize("method", NEW_FILLS)
def test_offline_fills_train_from_the_shards(filled_shards, tmp_path, method):
    train_two_steps(filled_shards, tmp_path / "run", method, cf_online=False)


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_online_rejects_offline_only_fills(filled_shards, tmp_path, method):
    config = TrainConfig(shards=str(filled_shards), out=str(tmp_path / "run"), cf=method, cf_online=True, device="cpu")
    with pytest.raises(UserError, match=f"--cf {method} is offline only"):
        train(config)


def test_without_online_the_shards_must_carry_the_fill(plain_shards, tmp_path):
    config = TrainConfig(shards=str(plain_shards), out=str(tmp_path / "run"), cf="random", device="cpu")
    with pytest.raises(UserError, match="the shards carry no 'random' counterfactual"):
        train(config)


def test_random_fills_preprocess_byte_identical_across_runs(filled_shards, tmp_path):
    again = tmp_path / "shards"
    preprocess(tiny_dataset(), again, NEW_FILLS, shard_size=8, progress=False)
    files = sorted(p.relative_to(filled_shards) for p in filled_shards.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(f.suffix == ".tar" for f in files)
    for name in files:
        assert (filled_shards / name).read_bytes() == (again / name).read_bytes(), name
