"""`cfrobust show`: the grid's layout, its tiles pixel for pixel, the saliency columns, bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets.record import DatasetSource, Record
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards.reader import collate, decode_sample, iter_raw_samples, iter_samples, object_regions, split_info
from cfrobust.shards.schema import boxes_to_mask
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.factual import pasted_region
from cfrobust.trainer.pixels import normalize
from cfrobust.trainer.train import train
from cfrobust.trainer.visualize import HEADER, SALIENCY_TITLES, load_model, render_grid, saliency_maps

GREY_SIZE = 64
# Box edges on the 8-pixel JPEG block grid. With grey images (R = G = B, so the JPEG chroma is
# exactly constant), every 8x8 luma block outside the box holds the same pixels in the image and
# in its counterfactual, and decodes to the same values: outside the box the two stored JPEGs
# decode identically, so the checks below can demand exact equality there.
GREY_BOXES = [(8.0, 16.0, 32.0, 40.0), (24.0, 8.0, 56.0, 32.0), (16.0, 24.0, 48.0, 56.0), None]


class GreyBoxes(DatasetSource):
    """Four textured grey images, three with one block-aligned box (labels 0, 1, 0) and one without."""

    name = "grey"
    classes = ["a", "b"]
    splits = ["train"]
    default_size = GREY_SIZE
    mixed_order = True  # stored as listed: `show` takes the first samples, which the tests name

    def records(self, split):
        rng = np.random.default_rng(7)
        for index, box in enumerate(GREY_BOXES):
            grey = rng.integers(0, 256, (GREY_SIZE, GREY_SIZE, 1), dtype=np.uint8)
            yield Record(key=f"grey_{index}", image=np.repeat(grey, 3, axis=2), label=index % 2,
                         boxes=[box] if box else [], group=f"g{index % 2}", split=split, source=f"grey/{index}")


@pytest.fixture(scope="module")
def grey_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("grey") / "shards"
    preprocess(GreyBoxes(), root, ["tile"], shard_size=2, progress=False)
    return root


def stored_samples(split_dir) -> dict[str, dict]:
    """The split's samples as the reader decodes them with their masks, by key."""
    info = split_info(split_dir)
    paths = [split_dir / s["name"] for s in info["shards"]]
    raws = iter_raw_samples(paths, info["cf_methods"], masks=True)
    return {s["key"]: s for s in (decode_sample(raw, info["cf_methods"]) for raw in raws)}


def kept_region(sample: dict) -> np.ndarray:
    """What a factual keeps of a stored sample at the trainer's defaults on two classes (--f-erode
    auto: blend under the `any` partner), as training does."""
    images = torch.from_numpy(sample["image"]).permute(2, 0, 1)[None]
    rects = torch.from_numpy(boxes_to_mask(sample["boxes"], images.shape[3], images.shape[2]))[None, None]
    config = TrainConfig(f="mrand").with_factual_pairing(2)
    return pasted_region(object_regions([sample]), rects, normalize(images), config)[0, 0].numpy()


def enlarged(image: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def test_tiles_hold_the_stored_pixels_and_differ_exactly_where_the_method_says(grey_shards):
    grid = render_grid(grey_shards, "train", count=4, seed=0, factual_modes=["random", "mrand"], device="cpu")
    assert grid.titles == ["sample", "original", "boxes", "cf_tile", "F random", "F mrand"]
    assert grid.keys == ["grey_0", "grey_1", "grey_2", "grey_3"]  # all of them, in manifest order
    factor = 2  # 64-px images are enlarged to the 96-px minimum by a whole factor: 128-px tiles
    assert grid.tile == (128, 128)
    stored = stored_samples(grey_shards / "train")
    column = {title: i for i, title in enumerate(grid.titles)}
    for row, key in enumerate(grid.keys):
        sample = stored[key]
        original = grid.tile_at(row, column["original"])
        counterfactual = grid.tile_at(row, column["cf_tile"])
        assert np.array_equal(original, enlarged(sample["image"], factor))
        assert np.array_equal(counterfactual, enlarged(sample["cf"]["tile"], factor))
        box = enlarged(boxes_to_mask(sample["boxes"], GREY_SIZE, GREY_SIZE), factor)
        for mode in ("F random", "F mrand"):
            factual = grid.tile_at(row, column[mode])
            assert np.array_equal(factual[box], original[box]), mode  # the object is kept exactly
            if sample["boxes"]:
                changed = (factual != original).any(axis=2)[~box].mean()
                assert changed > 0.6, (mode, key, changed)  # the background is replaced
            else:
                assert np.array_equal(factual, original), mode  # no box: trained as ERM, as is
        if sample["boxes"]:
            assert np.array_equal(counterfactual[~box], original[~box])  # exactly equal outside
            assert (counterfactual[box] != original[box]).mean() > 0.3  # the object is gone
        else:
            assert np.array_equal(counterfactual, original)


def test_png_has_one_tile_per_sample_and_column_under_a_header(tiny_shards, tmp_path):
    out = tmp_path / "pictures" / "grid.png"
    result = CliRunner().invoke(cli, ["show", "--shards", str(tiny_shards), "-n", "5", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    columns = ["sample", "original", "boxes"] + [f"cf_{m}" for m in ("mean", "tile", "random", "shuffle", "telea", "ns", "cagan")]
    columns += ["F random", "F shuffle", "F mrand"]
    assert f"5 samples x {len(columns)} columns ({', '.join(columns)})" in result.output
    picture = cv2.imread(str(out))
    assert picture.shape == (HEADER + 5 * 96, len(columns) * 96, 3)  # 32-px images, tripled
    grid = render_grid(tiny_shards, "train", count=5, seed=3, device="cpu")
    assert np.array_equal(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB), grid.image)  # PNG is lossless
    assert render_grid(tiny_shards, "train", count=5, seed=4, device="cpu").keys != grid.keys  # the seed picks


def test_more_samples_than_the_split_holds_shows_all_with_a_note(tiny_shards, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["show", "--shards", str(tiny_shards), "--split", "val", "-n", "40",
                                      "--f", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: val holds 32 samples, fewer than -n 40: showing all of them" in result.output
    assert cv2.imread(str(out)).shape[0] == HEADER + 32 * 96


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--split", "nope"], "no split 'nope' (found: train, val, test)"),
        (["--f", "mrand,fgsm"], "--f fgsm attacks a model: pass --checkpoint"),
        (["--f", "blur"], "unknown factual mode 'blur'"),
        (["-n", "0"], "-n must be at least 1"),
        (["--checkpoint", "missing.pt"], "missing.pt: no such checkpoint"),
    ],
)
def test_bad_input_is_one_line(tiny_shards, tmp_path, arguments, message):
    result = CliRunner().invoke(cli, ["show", "--shards", str(tiny_shards), "--out", str(tmp_path / "g.png"), *arguments])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("where, message", [("empty", "no shards here"), ("split", "one split's folder")])
def test_a_folder_that_is_not_a_shard_root_is_one_line(tiny_shards, tmp_path, where, message):
    (tmp_path / "empty").mkdir()
    folder = tmp_path / "empty" if where == "empty" else tiny_shards / "train"
    result = CliRunner().invoke(cli, ["show", "--shards", str(folder), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def checkpoint(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("show_run") / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), arch="simple-cnn", epochs=1, batch=32, lr=0.05,
                      workers=0, device="cpu", quiet=True))
    return run / "checkpoints" / "best.pt"


def test_checkpoint_adds_attacks_and_saliency_columns(tiny_shards, checkpoint):
    grid = render_grid(tiny_shards, "val", count=4, seed=1, factual_modes=["fgsm", "pgd"], checkpoint=checkpoint, device="cpu")
    assert grid.titles[-5:] == ["F fgsm", "F pgd", *SALIENCY_TITLES]
    column = {title: i for i, title in enumerate(grid.titles)}
    stored = stored_samples(tiny_shards / "val")
    for row, key in enumerate(grid.keys):
        original = grid.tile_at(row, column["original"])
        box = enlarged(boxes_to_mask(stored[key]["boxes"], 32, 32), 3)
        region = enlarged(kept_region(stored[key]), 3)  # the mask less its blended edge: training keeps it
        assert region.sum() < box.sum()  # the synthetic objects are round: the mask is not the box
        for mode in ("F fgsm", "F pgd"):
            attacked = grid.tile_at(row, column[mode])
            assert np.array_equal(attacked[region], original[region])
            assert (attacked != original).any(axis=2)[~box].mean() > 0.5
        for title in SALIENCY_TITLES:  # a heat map blended over the image changes it
            assert (grid.tile_at(row, column[title]) != original).any()


def test_mrand_is_drawn_with_the_mask_shrunk_as_the_checkpoints_run_trained(tiny_shards, tmp_path):
    from cfrobust.trainer.pixels import erode

    run = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), arch="simple-cnn", epochs=1, batch=32, workers=0,
                      device="cpu", quiet=True, f="mrand", f_erode="1"))
    grid = render_grid(tiny_shards, "val", count=4, seed=1, factual_modes=["mrand"],
                       checkpoint=run / "checkpoints" / "best.pt", device="cpu")
    column = {title: i for i, title in enumerate(grid.titles)}
    stored = stored_samples(tiny_shards / "val")
    rims = []
    for row, key in enumerate(grid.keys):
        original, factual = grid.tile_at(row, column["original"]), grid.tile_at(row, column["F mrand"])
        mask = object_regions([stored[key]])[0:1]
        kept = erode(mask, 1)[0, 0].numpy()
        rim = mask[0, 0].numpy() & ~kept  # empty for a ring too thin to shrink (erode keeps it whole)
        assert np.array_equal(factual[enlarged(kept, 3)], original[enlarged(kept, 3)])  # the shrunk object, exactly
        if rim.any():
            rims.append((factual != original).any(axis=2)[enlarged(rim, 3)].mean())
    assert len(rims) >= 2 and min(rims) > 0.5, rims  # the rim is the partner's background, as in training


def test_a_damaged_or_foreign_checkpoint_is_one_line_in_show_and_eval(tiny_shards, checkpoint, tmp_path):
    from cfrobust.trainer.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    cases = {
        "no-classes.pt": ({k: v for k, v in state.items() if k != "classes"}, "not a checkpoint of `cfrobust train` "
                                                                               "(no class names or architecture)"),
        "other-arch.pt": ({**state, "config": {**state["config"], "arch": "resnet18"}},
                          "the weights do not fit a resnet18 with 2 classes (Error(s) in loading state_dict for ResNet:"),
        "renamed.pt": ({**state, "classes": ["x", "y"]}, "trained on classes ['x', 'y'], but "),
    }
    for name, (saved, message) in cases.items():
        save_checkpoint(tmp_path / name, saved)
        for command in (["show", "--out", str(tmp_path / "g.png")], ["eval", "--out", str(tmp_path / "e.json")]):
            result = CliRunner().invoke(cli, [*command, "--shards", str(tiny_shards), "--checkpoint", str(tmp_path / name)])
            assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
            assert result.output.startswith(f"Error: {tmp_path / name}: {message}"), result.output


def test_saliency_maps_are_not_constant(tiny_shards, checkpoint):
    info = split_info(tiny_shards / "val")
    samples = list(iter_samples([tiny_shards / "val" / info["shards"][0]["name"]], []))[:4]
    shown = load_model(checkpoint, info["classes"], torch_device("cpu"))
    maps = saliency_maps(shown, collate(samples))
    assert len(maps) == len(SALIENCY_TITLES)
    for title, heats in zip(SALIENCY_TITLES, maps):
        assert heats.shape == (4, 32, 32) and (heats >= 0).all()
        assert all(heat.max() > heat.min() for heat in heats), title


def torch_device(name: str):
    import torch

    return torch.device(name)
