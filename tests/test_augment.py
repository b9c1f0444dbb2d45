"""Training augmentation (trainer/augment.py): box-keeping crop, flip and jitter move the image, its
counterfactuals, its object region and its boxes together, seeded by (seed, epoch, key)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.augment import Augmentation, color_jitter, parse_floats, sample_uniforms
from cfrobust.trainer.pixels import box_masks

SIDE = 32


def painted_batch(boxes: list[list[list[float]]]) -> Batch:
    """uint8 images, black except for the pixels of their boxes (200 + the sample's index modulo 50), a
    counterfactual that is the image inverted, and the boxes' rectangles as the object region."""
    count, most = len(boxes), max(1, max(len(b) for b in boxes))
    box_tensor = torch.zeros(count, most, 4)
    valid = torch.zeros(count, most, dtype=torch.bool)
    for i, sample in enumerate(boxes):
        for k, box in enumerate(sample):
            box_tensor[i, k] = torch.tensor(box)
            valid[i, k] = True
    region = box_masks(box_tensor, valid, SIDE, SIDE)
    images = torch.where(region, 200 + torch.arange(count).view(-1, 1, 1, 1) % 50, 0).to(torch.uint8).expand(-1, 3, -1, -1)
    return Batch(images=images.contiguous(), labels=torch.zeros(count, dtype=torch.long), boxes=box_tensor,
                 box_valid=valid, cf={"tile": 255 - images}, groups=[""] * count,
                 keys=[f"key{i}" for i in range(count)], masks=region)


def test_a_painted_box_stays_exactly_under_its_moved_box_in_image_counterfactual_and_mask():
    batch = painted_batch([[[3, 4, 9, 11]], [[20, 18, 31, 30]], [[0, 0, 5, 5], [25, 26, 32, 32]], [[10.5, 7.2, 14.6, 9.9]]])
    for epoch in range(40):
        out = Augmentation(crop=24, hflip=True, seed=3)(batch, epoch)
        assert out.images.shape == (4, 3, 24, 24) and out.masks.shape == (4, 1, 24, 24)
        under_boxes = box_masks(out.boxes, out.box_valid, 24, 24)
        painted = out.images[:, 0] > 0
        assert torch.equal(painted, under_boxes[:, 0])
        assert torch.equal(out.masks, under_boxes)
        assert torch.equal(out.cf["tile"], 255 - out.images)  # the same window and flip
    assert out.images.dtype == torch.uint8


def test_flip_mirrors_pixels_and_boxes_exactly():
    batch = painted_batch([[[3, 4, 9, 11]]] * 64)
    batch.keys[:] = [f"k{i}" for i in range(64)]
    out = Augmentation(hflip=True, seed=0)(batch, 0)
    flipped = out.boxes[:, 0, 0] != 3
    assert 16 < int(flipped.sum()) < 48  # about half
    assert torch.equal(out.boxes[flipped, 0], torch.tensor([SIDE - 9.0, 4, SIDE - 3.0, 11]).expand(int(flipped.sum()), 4))
    assert torch.equal(out.images[flipped], batch.images[flipped].flip(-1))
    assert torch.equal(out.images[~flipped], batch.images[~flipped])


def test_a_box_in_a_corner_is_always_in_the_crop():
    corners = [[[0, 0, 3, 3]], [[29, 0, 32, 3]], [[0, 29, 3, 32]], [[29, 29, 32, 32]]]
    batch = painted_batch(corners * 25)
    batch.keys[:] = [f"k{i}" for i in range(100)]
    for epoch in range(5):
        for augmentation in (Augmentation(crop=8, seed=epoch), Augmentation(crop=12, scale=(0.05, 0.3), seed=epoch)):
            out = augmentation(batch, epoch)
            assert out.box_valid[:, 0].all()
            assert (out.images[:, 0] > 0).flatten(1).any(dim=1).all()  # some object pixels in every crop


def test_samples_without_a_box_get_a_plain_random_crop():
    batch = painted_batch([[]] * 50)
    batch.keys[:] = [f"k{i}" for i in range(50)]
    # Each pixel holds its own position, so the crop's first pixel says where the window sat.
    positions = torch.arange(SIDE * SIDE).view(1, 1, SIDE, SIDE)
    batch = Batch(images=positions.expand(50, 3, -1, -1).contiguous(), labels=batch.labels, boxes=batch.boxes,
                  box_valid=batch.box_valid, keys=batch.keys, groups=batch.groups, masks=batch.masks)
    out = Augmentation(crop=16, seed=1)(batch, 0)
    assert out.images.shape == (50, 3, 16, 16) and not out.box_valid.any() and not out.masks.any()
    corners = out.images[:, 0, 0, 0]
    tops, lefts = corners // SIDE, corners % SIDE
    assert int(tops.max()) <= 16 and int(lefts.max()) <= 16  # the window fits in the image
    assert len(set(tops.tolist())) > 8 and len(set(lefts.tolist())) > 8  # and lies anywhere
    assert torch.equal(out.images[:, 0], corners[:, None, None] + torch.arange(16)[:, None] * SIDE + torch.arange(16))
    draws = sample_uniforms(1, 0, batch.keys)
    assert draws.shape == (50, 10) and 0 <= float(draws.min()) and float(draws.max()) < 1


def test_each_sample_is_augmented_the_same_way_whatever_the_batch_around_it():
    """What a resumed run or another rank layout relies on: parameters depend on (seed, epoch, key)."""
    boxes = [[[2 + i, 3, 12 + i, 15]] for i in range(8)]
    whole = painted_batch(boxes)
    augmentation = Augmentation(crop=20, hflip=True, jitter=(0.4, 0.4, 0.4, 0.1), seed=5)
    together = augmentation(whole, epoch=2)
    for order in ([3, 1], [7, 0, 5]):
        part = painted_batch([boxes[i] for i in order])
        part.keys[:] = [whole.keys[i] for i in order]
        part = Batch(images=whole.images[order], labels=whole.labels[order], boxes=whole.boxes[order],
                     box_valid=whole.box_valid[order], cf={"tile": whole.cf["tile"][order]}, keys=part.keys,
                     groups=[""] * len(order), masks=whole.masks[order])
        alone = augmentation(part, epoch=2)
        assert torch.equal(alone.images, together.images[order])
        assert torch.equal(alone.boxes, together.boxes[order])
    assert not torch.equal(augmentation(whole, epoch=3).images, together.images)  # a new epoch, new draws


def test_jitter_gives_image_and_counterfactual_the_same_factors():
    batch = painted_batch([[[3, 4, 9, 11]], [[5, 5, 20, 20]]])
    batch = Batch(images=batch.images, labels=batch.labels, boxes=batch.boxes, box_valid=batch.box_valid,
                  cf={"tile": batch.images.clone()}, keys=batch.keys, groups=batch.groups, masks=batch.masks)
    out = Augmentation(jitter=(0.5, 0.5, 0.5, 0.2), seed=0)(batch, 0)
    assert torch.equal(out.cf["tile"], out.images)
    assert not torch.equal(out.images, batch.images)


def test_brightness_alone_scales_every_channel_by_the_drawn_factor():
    image = torch.tensor([[[[100]], [[50]], [[10]]]], dtype=torch.uint8)
    factors = torch.tensor([[1.5, 1.0, 1.0, 0.0]])
    assert color_jitter(image, factors).flatten().tolist() == [150, 75, 15]
    saturated = color_jitter(image, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))  # saturation 0: grey
    grey = round(0.299 * 100 + 0.587 * 50 + 0.114 * 10)
    assert saturated.flatten().tolist() == [grey] * 3
    half_turn = color_jitter(torch.tensor([[[[128]], [[128]], [[128]]]], dtype=torch.uint8), torch.tensor([[1, 1, 1, 0.5]]))
    assert half_turn.flatten().tolist() == [128, 128, 128]  # grey has no hue to turn


def test_random_resized_crop_keeps_area_within_the_scale_and_output_at_the_crop_side():
    batch = painted_batch([[[8, 8, 24, 24]]] * 30)
    batch.keys[:] = [f"k{i}" for i in range(30)]
    out = Augmentation(crop=16, scale=(0.25, 0.5), seed=2)(batch, 0)
    assert out.images.shape == (30, 3, 16, 16)
    assert out.box_valid.all()


@pytest.mark.parametrize("text, count", [("1,2,3", 4), ("a,b", 2), ("-1,0.5", 2), ("0.1", 2)])
def test_bad_option_text_is_one_line(text, count):
    with pytest.raises(UserError, match="expected"):
        parse_floats(text, "color-jitter", count)


def test_parse_floats_reads_the_numbers():
    assert parse_floats("0.4,0.4,0.4,0.1", "color-jitter", 4) == (0.4, 0.4, 0.4, 0.1)
    assert np.allclose(parse_floats("0.35,1", "crop-scale", 2), (0.35, 1.0))


def test_a_hue_range_past_half_the_colour_circle_is_refused():
    from cfrobust.trainer.augment import parse_jitter

    assert parse_jitter("0.4,0.4,0.4,0.5") == (0.4, 0.4, 0.4, 0.5)
    with pytest.raises(UserError, match=r"hue range \(4th number\) must lie in \[0, 0.5\]"):
        parse_jitter("0.4,0.4,0.4,0.6")
