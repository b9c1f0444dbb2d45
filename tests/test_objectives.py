"""The method's loss terms against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cfrobust.shards.reader import Batch
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.counterfactual import logp_loss
from cfrobust.trainer.factual import batch_partner, mrand
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.pixels import box_masks
from cfrobust.trainer.saliency import bbox_outside_penalty, target_logit


def test_logp_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2])

    def by_hand(row, y):
        z = sum(math.exp(v) for v in row)
        return -math.log(1 - math.exp(row[y]) / z)

    expected = (by_hand([2.0, 0.5, -1.0], 0) + by_hand([0.0, 1.0, 3.0], 2)) / 2
    assert logp_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_logp_loss_is_cross_entropy_to_the_other_class_for_two_classes():
    logits = torch.tensor([[1.5, -0.5], [0.2, 0.9]])
    labels = torch.tensor([0, 1])
    other = torch.nn.functional.cross_entropy(logits, 1 - labels)
    assert logp_loss(logits, labels).item() == pytest.approx(other.item(), rel=1e-6)


def test_logp_loss_stays_finite_when_the_model_is_certain():
    # p_y rounds to exactly 1 in float32; -log(1 - p_y) = log(1 + e^60) ~ 60.
    loss = logp_loss(torch.tensor([[60.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(60.0, rel=1e-6)


class MaskedLinear(nn.Module):
    """logits_k = sum(weight_k * x * region): the model sees only the pixels in `region`."""

    def __init__(self, weight: torch.Tensor, region: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.register_buffer("region", region)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x * self.region, self.weight)


def _boxed_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1])
    boxes = torch.tensor([[[2.0, 2.0, 6.0, 6.0]], [[2.0, 2.0, 6.0, 6.0]]])
    holes = box_masks(boxes, torch.ones(2, 1, dtype=torch.bool), 8, 8)
    return x, labels, holes


def test_saliency_penalty_is_zero_when_the_model_looks_only_inside_the_box():
    x, labels, holes = _boxed_inputs()
    model = MaskedLinear(torch.randn(2, 3, 8, 8), holes[0].float().expand(3, 8, 8))
    penalty = bbox_outside_penalty(model(x), x, labels, holes, torch.tensor([True, True]), target_logit)
    assert penalty.item() == 0.0


def test_saliency_penalty_of_a_linear_model_is_its_weights_outside_the_box():
    x, labels, holes = _boxed_inputs()
    weight = torch.randn(2, 3, 8, 8)
    model = MaskedLinear(weight, torch.ones(3, 8, 8))
    penalty = bbox_outside_penalty(model(x), x, labels, holes, torch.tensor([True, True]), target_logit)
    outside = ~holes[0, 0]
    # d logit_y / dx = weight_y, so the penalty is the mean over samples and elements of
    # weight_y^2 outside the box.
    expected = sum(float((weight[y][:, outside] ** 2).sum()) for y in (0, 1)) / (2 * 3 * 64)
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    assert penalty.item() > 0


def test_saliency_penalty_ignores_samples_without_boxes():
    x, labels, holes = _boxed_inputs()
    weight = torch.randn(2, 3, 8, 8)
    model = MaskedLinear(weight, torch.ones(3, 8, 8))
    only_first = bbox_outside_penalty(model(x), x, labels, holes, torch.tensor([True, False]), target_logit)
    outside = ~holes[0, 0]
    assert only_first.item() == pytest.approx(float((weight[0][:, outside] ** 2).sum()) / (3 * 64), rel=1e-5)


def test_saliency_penalty_is_differentiable_in_the_weights():
    x, labels, holes = _boxed_inputs()
    model = MaskedLinear(torch.randn(2, 3, 8, 8), torch.ones(3, 8, 8))
    bbox_outside_penalty(model(x), x, labels, holes, torch.tensor([True, True]), target_logit).backward()
    grad = model.weight.grad
    # Only the weights outside the box influence the penalty.
    assert grad[:, :, 2:6, 2:6].abs().sum().item() == 0.0
    assert grad.abs().sum().item() > 0.0


def test_other_class_partner_picks_a_different_class_whenever_one_exists():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    for seed in range(5):
        partner = batch_partner(labels, torch.Generator().manual_seed(seed), "other-class")
        assert (labels[partner] != labels).all()
    same = batch_partner(torch.tensor([4, 4, 4]), torch.Generator().manual_seed(0), "other-class")
    assert (same != torch.arange(3)).all()


def test_mrand_keeps_the_object_on_the_other_class_real_background_with_its_object_tiled_over():
    images = torch.zeros(2, 3, 6, 6)
    images[0] = 1.0
    images[0, :, 1:3, 1:3] = 7.0  # object of image 0
    images[1] = torch.arange(6.0).view(1, 6, 1)  # row r holds value r
    images[1, :, 1:3, 0:6] = 9.0  # object of image 1 spans rows 1..2
    boxes = torch.tensor([[[1.0, 1.0, 3.0, 3.0]], [[0.0, 1.0, 6.0, 3.0]]])
    holes = box_masks(boxes, torch.ones(2, 1, dtype=torch.bool), 6, 6)
    out = mrand(images, holes, torch.tensor([0, 1]))
    # Image 0 keeps its object. Around it: image 1's own rows 0 and 3..5, and in image 1's hole
    # (rows 1..2) its widest free band, rows 3..5, tiled from the top: row r -> 3 + r % 3.
    assert torch.equal(out[0, :, 1:3, 1:3], torch.full((3, 2, 2), 7.0))
    expected_rows = torch.tensor([0.0, 4, 5, 3, 4, 5]).view(6, 1).expand(6, 6)
    outside = ~holes[0, 0]
    assert torch.equal(out[0, 0][outside], expected_rows[outside])
    # Image 1 keeps its object; image 0's background is 1.0, its object tiled over with 1.0.
    assert torch.equal(out[1, :, 1:3], torch.full((3, 2, 6), 9.0))
    assert torch.equal(out[1, :, 0], torch.ones(3, 6))
    assert torch.equal(out[1, :, 3:6], torch.ones(3, 3, 6))


def test_mrand_with_a_single_class_leaves_a_zero_background():
    images = torch.randn(3, 3, 6, 6)
    holes = box_masks(torch.tensor([[[1.0, 1.0, 4.0, 4.0]]]).expand(3, 1, 4), torch.ones(3, 1, dtype=torch.bool), 6, 6)
    out = mrand(images, holes, torch.tensor([2, 2, 2]))
    assert torch.equal(out, torch.where(holes, images, torch.zeros(())))


def test_any_partner_is_never_itself_and_ignores_the_class():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    same_class_picks = 0
    for seed in range(20):
        partner = batch_partner(labels, torch.Generator().manual_seed(seed), "any")
        assert (partner != torch.arange(6)).all()
        same_class_picks += int((labels[partner] == labels).sum())
    # 20 draws of 6 rows; a row's chance of a same-class partner is 1/5 or 2/5: some, not all.
    assert 0 < same_class_picks < 60


def test_same_class_partner_picks_its_own_class_whenever_it_can():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    for seed in range(5):
        partner = batch_partner(labels, torch.Generator().manual_seed(seed), "same-class")
        assert (partner != torch.arange(6)).all()
        assert (labels[partner][:5] == labels[:5]).all()  # class 2 has one member: another class's


def test_mrand_with_any_partner_uses_a_same_class_background():
    images = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 2.0)])
    holes = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    holes[:, :, 0, 0] = True  # a one-pixel object in the corner of each
    config = TrainConfig(f="mrand", f_partner="any")
    out = mrand(images, holes, torch.tensor([5, 5]), torch.Generator().manual_seed(0), config=config)
    # One class, two images: each object lands on the other image's (flat, tile-filled) background.
    assert out[0, 0, 0, 0].item() == 1.0 and (out[0][~holes[0]] == 2.0).all()
    assert out[1, 0, 0, 0].item() == 2.0 and (out[1][~holes[1]] == 1.0).all()
    # The official rule has no other class to take a background from: zeros.
    official = mrand(images, holes, torch.tensor([5, 5]), config=TrainConfig(f="mrand", f_partner="other-class"))
    assert (official[~holes] == 0.0).all()


def _batch(cf_methods=("tile",), boxed=(True, True, True, True)) -> Batch:
    torch.manual_seed(1)
    n = len(boxed)
    boxes = torch.tensor([[[4.0, 4.0, 12.0, 12.0]]] * n)
    return Batch(
        images=torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8),
        labels=torch.tensor([i % 2 for i in range(n)]),
        boxes=boxes,
        box_valid=torch.tensor([[b] for b in boxed]),
        cf={m: torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8) for m in cf_methods},
    )


def _tiny_model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_objective_terms_are_the_weighted_losses_of_one_forward_pass():
    batch, model = _batch(), _tiny_model()
    config = TrainConfig(cf="tile", cf_loss="logp", cf_coeff=0.5, reg="bbox_o", reg_coeff=3.0, reg_measure="raw")
    terms, logits = Objective(config, num_classes=2)(model, batch)
    assert set(terms) == {"ce", "cf", "sal"}
    from cfrobust.trainer.pixels import normalize

    x = normalize(batch.images)
    expected_ce = torch.nn.functional.cross_entropy(model(x), batch.labels)
    expected_cf = 0.5 * logp_loss(model(normalize(batch.cf["tile"])), batch.labels)
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert terms["cf"].item() == pytest.approx(expected_cf.item(), rel=1e-5)
    x.requires_grad_(True)
    holes = box_masks(batch.boxes, batch.box_valid, 16, 16)
    expected_sal = 3.0 * bbox_outside_penalty(model(x), x, batch.labels, holes, torch.ones(4, dtype=torch.bool), target_logit)
    assert terms["sal"].item() == pytest.approx(expected_sal.item(), rel=1e-4)
    assert torch.allclose(logits, model(normalize(batch.images)), atol=1e-6)


def test_samples_without_boxes_train_as_plain_erm():
    batch, model = _batch(boxed=(True, False, False, False)), _tiny_model()
    terms, _ = Objective(TrainConfig(cf="tile", cf_loss="logp", f="mrand"), num_classes=2)(model, batch)
    from cfrobust.trainer.pixels import normalize

    # The CF term sees only the boxed sample (weighted by the default --cf-coeff 0.5).
    expected_cf = 0.5 * logp_loss(model(normalize(batch.cf["tile"][:1])), batch.labels[:1])
    assert terms["cf"].item() == pytest.approx(expected_cf.item(), rel=1e-5)
    none_boxed = _batch(boxed=(False,) * 4)
    terms, _ = Objective(TrainConfig(cf="tile", reg="bbox_o"))(model, none_boxed)
    assert terms["cf"].item() == 0.0 and terms["sal"].item() == 0.0
