"""The object region in training: masks read from the shards, kept by F, rewarded by Sal; the
CF hole stays the boxes' rectangle; --crop/--hflip/--color-jitter and --normalize in whole runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.shards.reader import TrainShards, decode_sample, iter_raw_samples, split_info
from cfrobust.shards.schema import boxes_to_mask
from cfrobust.trainer.checkpoint import load_checkpoint
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.factual import mrand, pasted_region
from cfrobust.trainer.fills import online_tile, to_normalized
from cfrobust.trainer.objective import Objective
from cfrobust.shards.reader import Batch
from cfrobust.trainer.pixels import blended_edge, erode, normalize, set_normalization
from cfrobust.trainer.saliency import outside_box_penalty
from cfrobust.trainer.train import train


def stored_masks(split_dir) -> dict[str, np.ndarray]:
    info = split_info(split_dir)
    raws = iter_raw_samples([split_dir / s["name"] for s in info["shards"]], [], masks=True)
    return {s["key"]: s["mask"] for s in (decode_sample(raw, []) for raw in raws)}


def test_the_training_stream_carries_each_samples_stored_mask(tiny_shards):
    masks = stored_masks(tiny_shards / "train")
    batch = next(iter(TrainShards(tiny_shards / "train", 16, [], seed=0, masks=True)))
    assert batch.masks.shape == (16, 1, 32, 32) and batch.masks.dtype == torch.bool
    for key, region, boxes in zip(batch.keys, batch.masks, batch.boxes):
        assert np.array_equal(region[0].numpy(), masks[key])
        assert masks[key].sum() < boxes_to_mask(boxes[:1].tolist(), 32, 32).sum()  # round objects: smaller than the box
    assert next(iter(TrainShards(tiny_shards / "train", 16, [], seed=0))).masks is None  # not asked: not read


def test_without_a_mask_the_region_is_the_boxes_and_without_boxes_it_is_empty():
    from cfrobust.shards.reader import object_regions

    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2, 3] = True
    regions = object_regions([
        {"image": image, "boxes": [[1, 1, 4, 3]], "mask": mask},
        {"image": image, "boxes": [[1, 1, 4, 3]]},
        {"image": image, "boxes": [], "mask": mask},  # --box-fraction dropped its boxes: plain ERM
    ])
    assert np.array_equal(regions[0, 0].numpy(), mask)
    assert np.array_equal(regions[1, 0].numpy(), boxes_to_mask([[1, 1, 4, 3]], 8, 8))
    assert not regions[2].any()


def test_mrand_keeps_the_mask_and_fills_the_rest_of_the_box_from_the_other_background():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    rects = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    rects[:, :, 2:6, 2:6] = True
    region = torch.zeros_like(rects)
    region[:, :, 3:5, 3:5] = True  # the object: the middle of its box
    out = mrand(x, region, torch.tensor([0, 1]), rects=rects)
    partner_background = online_tile(x, rects)[[1, 0]]
    assert torch.equal(out[region.expand_as(x)], x[region.expand_as(x)])
    assert torch.equal(out[~region.expand_as(x)], partner_background[~region.expand_as(x)])
    inside_box_outside_mask = (rects & ~region).expand_as(x)
    assert not torch.equal(out[inside_box_outside_mask], x[inside_box_outside_mask])


def test_erode_shrinks_a_mask_keeps_the_frame_edge_and_never_erases_an_object():
    masks = torch.zeros(3, 1, 9, 9, dtype=torch.bool)
    masks[0, 0, 2:7, 2:7] = True  # a 5 x 5 square
    masks[1, 0, 0:4, 0:9] = True  # a band along the top edge of the frame
    masks[2, 0, 4, 3:6] = True  # a 1 x 3 line: erosion would leave nothing
    shrunk = erode(masks, 1)
    expected = torch.zeros_like(masks)
    expected[0, 0, 3:6, 3:6] = True
    expected[1, 0, 0:3, 0:9] = True  # only the side inside the image moves
    expected[2] = masks[2]
    assert torch.equal(shrunk, expected)
    assert torch.equal(erode(masks, 0), masks)
    assert torch.equal(erode(masks, 2)[0, 0], (torch.arange(9)[:, None] == 4) & (torch.arange(9)[None, :] == 4))


def test_f_erode_pastes_the_shrunk_mask_and_leaves_its_rim_to_the_partner():
    n = 2
    images = torch.stack([torch.full((3, 12, 12), 10, dtype=torch.uint8), torch.full((3, 12, 12), 200, dtype=torch.uint8)])
    masks = torch.zeros(n, 1, 12, 12, dtype=torch.bool)
    masks[:, :, 3:8, 3:8] = True
    batch = Batch(images=images, labels=torch.tensor([0, 1]), boxes=torch.tensor([[[2.0, 2.0, 9.0, 9.0]]] * n),
                  box_valid=torch.ones(n, 1, dtype=torch.bool), cf={}, masks=masks)
    seen = {}
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 144, 2))
    objective = Objective(TrainConfig(f="mrand", f_erode="scaled"), num_classes=2)  # 1 px at this side
    objective._forward = lambda model, rows: seen.update(rows) or {name: model(r) for name, r in rows.items()}
    objective(model, batch)
    x = normalize(images)
    inner = erode(masks, 1)
    factual = seen["f"]
    # The eroded object is the image's own; its one-pixel rim now shows the other image (tile-filled flat).
    assert torch.equal(factual[inner.expand_as(x)], x[inner.expand_as(x)])
    rim = (masks & ~inner).expand_as(x)
    assert torch.equal(factual[rim], x[[1, 0]][rim])


def test_f_erode_blend_drops_the_edge_pixels_that_mix_object_and_background_and_keeps_an_outline():
    background, fill = torch.tensor([0.2, 0.6, 0.2]), torch.tensor([0.9, 0.1, 0.1])
    pixels = background.view(3, 1, 1).repeat(1, 12, 12)
    pixels[:, 3:9, 3:9] = fill.view(3, 1, 1)
    pixels[:, 3, 3:9] = (0.6 * fill + 0.4 * background).view(3, 1)  # top edge: a blend, 60% object
    pixels[:, 8, 3:9] = 0.0  # bottom edge: a black outline, far from the line between the two colours
    pixels[:, 4:8, 3] = (0.9 * fill + 0.1 * background).view(3, 1)  # left edge: 90% object, past 0.85
    masks = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    masks[..., 3:9, 3:9] = True
    expected = masks.clone()
    expected[0, 0, 3, 3:9] = False
    assert torch.equal(blended_edge(pixels[None], masks), masks & ~expected)
    # Through the factual: --f-erode blend keeps all but the blended row; rectangles stay whole,
    # whether the batch has no masks or this sample has none in a batch that has.
    images = to_normalized(pixels[None])
    rects = torch.zeros_like(masks)
    rects[..., 2:10, 2:10] = True
    assert torch.equal(pasted_region(masks, rects, images, TrainConfig(f_erode="blend")), expected)
    assert torch.equal(pasted_region(masks, rects, images, TrainConfig(f_erode="1")), erode(masks, 1))
    assert pasted_region(rects, rects, images, TrainConfig(f_erode="1")) is rects
    pair = pasted_region(torch.cat([masks, rects]), torch.cat([rects, rects]), images.repeat(2, 1, 1, 1),
                         TrainConfig(f_erode="blend"))
    assert torch.equal(pair, torch.cat([expected, rects]))
    # Object and background too alike to tell a blend: nothing is dropped.
    flat = background.view(1, 3, 1, 1).repeat(1, 1, 12, 12)
    flat[:, :, 3:9, 3:9] += 0.05
    assert not blended_edge(flat, masks).any()


def test_bbox_o_with_a_mask_penalises_exactly_the_pixels_outside_it():
    grads = torch.zeros(1, 3, 4, 4)
    region = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    region[0, 0, 1:3, 1:3] = True
    grads[0, 0, 1, 1] = 5.0  # inside the mask: free
    grads[0, 1, 0, 0] = 2.0  # outside: 4
    grads[0, 2, 3, 2] = 1.0  # outside: 1
    penalty = outside_box_penalty(grads, region, torch.tensor([True]))
    assert penalty.item() == pytest.approx((4 + 1) / 48)


def test_bit_normalisation_maps_pixels_to_minus_one_one():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    set_normalization("bit")
    try:
        assert normalize(images).flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    finally:
        set_normalization("imagenet")
    assert normalize(images).flatten()[0].item() == pytest.approx(-0.485 / 0.229, rel=1e-6)


def run_options(tiny_shards, out, *extra) -> list[str]:
    return ["train", "--shards", str(tiny_shards), "--out", str(out), "--arch", "simple-cnn", "--epochs", "1",
            "--batch", "32", "--lr", "0.05", "--workers", "0", "--device", "cpu", "--quiet", *extra]


def weights(run) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_object_region_mask_and_box_train_differently(tiny_shards, tmp_path):
    method = ["--cf", "tile", "--f", "mrand", "--reg", "bbox_o", "--reg-coeff", "100"]
    for region in ("mask", "box"):
        result = CliRunner().invoke(cli, run_options(tiny_shards, tmp_path / region, "--object-region", region, *method))
        assert result.exit_code == 0, result.output
    by_mask, by_box = weights(tmp_path / "mask"), weights(tmp_path / "box")
    assert any(not torch.equal(by_mask[k], by_box[k]) for k in by_mask)


def test_augmented_run_trains_on_crops_and_evaluates_at_the_crop_side(tiny_shards, tmp_path, monkeypatch):
    import cfrobust.trainer.evaluate as evaluate

    sides = []
    real = evaluate.model_inputs
    monkeypatch.setattr(evaluate, "model_inputs", lambda images, size=None: sides.append(size) or real(images, size))
    options = ["--cf", "tile", "--f", "mrand", "--reg", "bbox_o", "--crop", "24", "--hflip", "--color-jitter", "0.2,0.2,0.2,0.05",
               "--normalize", "bit"]
    result = CliRunner().invoke(cli, run_options(tiny_shards, tmp_path / "run", *options))
    assert result.exit_code == 0, result.output
    assert set(sides) == {24}
    document = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert document["config"]["crop"] == 24 and document["config"]["normalize"] == "bit"
    rerun = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"),
                                     "--shards", str(tiny_shards), "--out", str(tmp_path / "again.json")])
    assert rerun.exit_code == 0, rerun.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["splits"]["test"]["accuracy"] == document["splits"]["test"]["accuracy"]
    assert again["splits"]["test"]["loss"] == pytest.approx(document["splits"]["test"]["loss"], rel=1e-6)


def test_augmented_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_one(tiny_shards, tmp_path):
    options = ["--f", "mrand", "--crop", "24", "--hflip", "--color-jitter", "0.2,0.2,0.2,0.05", "--epochs", "2"]
    whole = CliRunner().invoke(cli, run_options(tiny_shards, tmp_path / "whole", *options))
    assert whole.exit_code == 0, whole.output
    config = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "cut"), arch="simple-cnn", epochs=2, batch=32,
                         lr=0.05, workers=0, device="cpu", quiet=True, f="mrand", crop=24, hflip=True,
                         color_jitter="0.2,0.2,0.2,0.05", save_every=4)
    import cfrobust.trainer.train as trainer

    class Stop(Exception):
        pass

    real_step = trainer.optimizer_step
    steps = []

    def stop_after_four(parts, batch):
        if len(steps) == 4:
            raise Stop
        steps.append(1)
        return real_step(parts, batch)

    trainer.optimizer_step = stop_after_four
    try:
        with pytest.raises(Stop):
            train(config)
    finally:
        trainer.optimizer_step = real_step
    resumed = CliRunner().invoke(cli, run_options(tiny_shards, tmp_path / "cut", *options, "--resume", "--save-every", "4"))
    assert resumed.exit_code == 0, resumed.output
    cut, uninterrupted = weights(tmp_path / "cut"), weights(tmp_path / "whole")
    assert all(torch.equal(cut[k], uninterrupted[k]) for k in cut)


@pytest.mark.parametrize("extra, message", [
    (["--crop", "40"], "--crop 40: the shards store 32-px images"),
    (["--crop-scale", "0.3,1"], "give its output side with --crop"),
    (["--crop", "24", "--crop-scale", "0.5,0.2"], "need 0 < MIN <= MAX <= 1"),
    (["--color-jitter", "0.4,0.4"], "expected 4 comma-separated"),
    (["--f", "mrand", "--bbox-noise", "0.5"], "add --object-region box"),
])
def test_bad_augmentation_options_are_one_line(tiny_shards, tmp_path, extra, message):
    result = CliRunner().invoke(cli, run_options(tiny_shards, tmp_path / "run", *extra))
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
