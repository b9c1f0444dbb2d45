"""Every training objective: the DomainBed-style matrix of all CF losses x F modes x penalties x
saliency scores for two optimiser steps, then each term against a hand computation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.attributions import deeplift, grad_cam, grad_cam_layer
from cfrobust.trainer.baselines import gridmask, grid_drop_mask, mixup, mixup_cross_entropy
from cfrobust.trainer.config import CF_LOSSES, FACTUAL_MODES, REG_GRADS, REGULARIZERS, TrainConfig
from cfrobust.trainer.counterfactual import (
    channels_loss,
    output_size,
    uniform_except_label_loss,
    uniform_loss,
)
from cfrobust.trainer.factual import fgsm, pgd, random_background, shuffled_background
from cfrobust.trainer.fills import pixel_units
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.pixels import box_masks, normalize, normalized_range
from cfrobust.trainer.saliency import (
    bbox_f1_penalty,
    bbox_outside_penalty,
    gradient_supervision_penalty,
    input_gradient,
    log_prob_sum,
    logit_sum,
    target_log_prob,
    target_logit,
)


def _batch(n=4, size=16) -> Batch:
    torch.manual_seed(1)
    return Batch(
        images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8),
        labels=torch.tensor([i % 2 for i in range(n)]),
        boxes=torch.tensor([[[4.0, 4.0, 12.0, 12.0]]] * n),
        box_valid=torch.ones(n, 1, dtype=torch.bool),
        cf={"tile": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)},
    )


def _conv_model(outputs: int) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, outputs),
    )  # fmt: skip


# ---------------------------------------------------------------- the matrix


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("reg_grad", REG_GRADS)
def test_every_objective_trains_two_steps_with_finite_terms(reg, reg_grad):
    batch = _batch()
    expected_keys = {"ce", "cf"} | ({"sal"} if reg != "none" else set())
    for cf_loss in CF_LOSSES:
        for f in FACTUAL_MODES:
            config = TrainConfig(cf="tile", cf_loss=cf_loss, f=f, reg=reg, reg_grad=reg_grad, reg_coeff=0.5, f_steps=2)
            model = _conv_model(output_size(2, cf_loss))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            objective = Objective(config, torch.Generator().manual_seed(0), num_classes=2)
            before = model[5].weight.detach().clone()
            for _ in range(2):
                terms, logits = objective(model, batch)
                assert set(terms) == expected_keys, (cf_loss, f)
                assert all(torch.isfinite(t) for t in terms.values()), (cf_loss, f, terms)
                assert logits.shape == (4, 2)
                optimizer.zero_grad()
                sum(terms.values()).backward()
                assert all(torch.isfinite(p.grad).all() for p in model.parameters()), (cf_loss, f)
                optimizer.step()
            assert not torch.equal(model[5].weight, before)


def test_baselines_train_alone_and_with_every_term():
    batch = _batch()
    for extra in ({"mixup": 0.2}, {"label_smoothing": 0.1}, {"gridmask": True}):
        for method in ({}, {"cf": "tile", "f": "mrand", "reg": "bbox_o"}):
            model = _conv_model(2)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            objective = Objective(TrainConfig(**extra, **method), torch.Generator().manual_seed(0), num_classes=2)
            for _ in range(2):
                terms, logits = objective(model, batch)
                assert set(terms) == ({"ce", "cf", "sal"} if method else {"ce"})
                assert all(torch.isfinite(t) for t in terms.values())
                optimizer.zero_grad()
                sum(terms.values()).backward()
                optimizer.step()


def test_gs_without_a_counterfactual_is_a_user_error():
    with pytest.raises(UserError, match="--reg gs .* needs a counterfactual"):
        Objective(TrainConfig(reg="gs"))


# ---------------------------------------------------------------- counterfactual losses

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2])


def _log_softmax_rows(rows):
    out = []
    for row in rows:
        z = math.log(sum(math.exp(v) for v in row))
        out.append([v - z for v in row])
    return out


def test_uni_is_cross_entropy_to_the_uniform_distribution():
    logp = _log_softmax_rows(LOGITS.tolist())
    expected = sum(-sum(row) / 3 for row in logp) / 2
    assert uniform_loss(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_uni_e_is_cross_entropy_to_uniform_over_the_other_classes():
    logp = _log_softmax_rows(LOGITS.tolist())
    expected = (-(logp[0][1] + logp[0][2]) / 2 - (logp[1][0] + logp[1][1]) / 2) / 2
    assert uniform_except_label_loss(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_channels_targets_the_background_output_of_the_label():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.3, 0.1, 0.2, 2.0]])  # K = 2, 4 outputs
    logp = _log_softmax_rows(logits.tolist())
    expected = (-logp[0][0 + 2] - logp[1][1 + 2]) / 2
    assert channels_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-6)
    assert output_size(9, "channels") == 18 and output_size(9, "logp") == 9 and output_size(9, "uni_e") == 9


def test_channels_objective_uses_all_outputs_for_ce_and_returns_the_class_logits():
    batch, model = _batch(), _conv_model(4)
    terms, logits = Objective(TrainConfig(cf="tile", cf_loss="channels"))(model, batch)
    with torch.no_grad():
        both = model(torch.cat([normalize(batch.images), normalize(batch.cf["tile"])]))
    expected_ce = nn.functional.cross_entropy(both[:4], batch.labels)
    expected_cf = 0.5 * nn.functional.cross_entropy(both[4:], batch.labels + 2)  # the default --cf-coeff 0.5
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert terms["cf"].item() == pytest.approx(expected_cf.item(), rel=1e-5)
    assert torch.allclose(logits, both[:4, :2], atol=1e-6)


# ---------------------------------------------------------------- factual backgrounds


def _object_scene(n=2, size=8):
    torch.manual_seed(3)
    x = normalize(torch.randint(100, 150, (n, 3, size, size), dtype=torch.uint8))
    boxes = torch.tensor([[[2.0, 2.0, 6.0, 5.0]]] * n)
    holes = box_masks(boxes, torch.ones(n, 1, dtype=torch.bool), size, size)
    return x, holes, torch.arange(n) % 2


def test_random_background_keeps_the_object_and_ignores_the_old_background():
    x, holes, y = _object_scene()
    other = x.clone()
    other[~holes.expand_as(x)] = 1.5  # a different background, same object
    out = random_background(x, holes, y, torch.Generator().manual_seed(0))
    again = random_background(other, holes, y, torch.Generator().manual_seed(0))
    inside = holes.expand_as(x)
    assert torch.equal(out[inside], x[inside])
    assert torch.equal(out[~inside], again[~inside])  # the new background owes nothing to the old one
    assert (out[~inside] != x[~inside]).float().mean() > 0.95
    # One colour per image and channel plus noise of std 0.2 (in [0, 1] units), as the random fill.
    background = pixel_units(out)[0, 0][~holes[0, 0]]
    assert 0.05 < background.std().item() < 0.35


def test_shuffle_background_draws_the_values_of_the_whole_batch():
    # Image 0 is 0.2 everywhere, image 1 is 0.8 everywhere (in pixel units): the official
    # shuffle permutes the batch's values, so each background mixes both.
    pixels = torch.empty(2, 3, 8, 8)
    pixels[0], pixels[1] = 0.2, 0.8
    x = normalize((pixels * 255).round().to(torch.uint8))
    _, holes, y = _object_scene()
    out = shuffled_background(x, holes, y, torch.Generator().manual_seed(0))
    inside = holes.expand_as(x)
    assert torch.equal(out[inside], x[inside])
    values = (pixel_units(out) * 255).round()
    for i in range(2):
        background = values[i][~inside[i]]
        assert set(background.unique().tolist()) == {51.0, 204.0}


class Linear(nn.Module):
    """logits_k = sum(weight_k * x) + bias_k: every input gradient is known by hand."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias if bias is not None else torch.zeros(len(weight)))

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight) + self.bias


def test_fgsm_is_x_plus_eps_sign_of_the_ce_gradient_outside_the_object():
    x, holes, y = _object_scene()
    weight = torch.randn(2, 3, 8, 8) * 0.1
    model = Linear(weight)
    out = fgsm(x, holes, y, model=model, config=TrainConfig(f_eps=0.1))
    # d CE_i / dx_i = sum_k (p_ik - [k = y_i]) weight_k for a linear model.
    p = torch.softmax(torch.einsum("bchw,kchw->bk", x, weight), dim=1)
    coeff = p - nn.functional.one_hot(y, 2).float()
    grad = torch.einsum("bk,kchw->bchw", coeff, weight)
    expected = torch.where(holes, x, x + 0.1 * grad.sign())
    assert torch.allclose(out, expected, atol=1e-6)
    assert not out.requires_grad and model.weight.grad is None


def test_fgsm_stays_within_the_pixel_range():
    x, holes, y = _object_scene()
    out = fgsm(x, holes, y, model=Linear(torch.randn(2, 3, 8, 8)), config=TrainConfig(f_eps=50.0))
    low, high = normalized_range()
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()
    assert torch.isclose(out, low).any() and torch.isclose(out, high).any()


class ModeProbe(nn.Module):
    """A BatchNorm model that records the mode of every forward pass."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(128, 2))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.net[1].training)
        return self.net(x)


def test_attacks_run_in_eval_mode_and_leave_running_statistics_alone():
    x, holes, y = _object_scene()
    model = ModeProbe().train()
    stats = model.net[1].running_mean.clone()
    for attack in (fgsm, pgd):
        attack(x, holes, y, torch.Generator().manual_seed(0), model=model, config=TrainConfig(f_steps=2))
    assert model.modes == [False] * 3 and model.training and model.net[1].training
    assert torch.equal(model.net[1].running_mean, stats)


def test_grad_cam_uses_batch_statistics_and_leaves_the_running_ones_alone():
    x, _, y = _object_scene()
    model = ModeProbe().train()
    stats, batches = model.net[1].running_mean.clone(), int(model.net[1].num_batches_tracked)
    maps = grad_cam(model, x, y)
    assert model.modes == [True] and model.net[1].track_running_stats
    assert torch.equal(model.net[1].running_mean, stats) and int(model.net[1].num_batches_tracked) == batches
    model.net[1].running_mean.fill_(5.0)  # batch statistics: the running ones do not enter the map
    assert torch.allclose(grad_cam(model, x, y), maps)


def test_pgd_stays_in_the_eps_ball_outside_the_object():
    x, holes, y = _object_scene()
    config = TrainConfig(f_eps=0.3, f_steps=3)
    out = pgd(x, holes, y, torch.Generator().manual_seed(0), model=Linear(torch.randn(2, 3, 8, 8)), config=config)
    inside = holes.expand_as(x)
    assert torch.equal(out[inside], x[inside])
    change = (out - x)[~inside].abs()
    assert change.max() <= 0.3 + 1e-6 and change.mean() > 0.1


def test_pgd_steps_by_alpha_and_stops_moving_misclassified_samples():
    x, holes, _ = _object_scene()
    weight = torch.randn(2, 3, 8, 8) * 0.01
    model = Linear(weight, torch.tensor([0.0, 100.0]))  # predicts class 1 whatever the input
    y = torch.tensor([0, 1])
    config = TrainConfig(f_eps=0.3, f_alpha=0.05, f_steps=2)
    out = pgd(x, holes, y, torch.Generator().manual_seed(4), model=model, config=config)
    start = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 0.3
    start = torch.where(holes, x, x + start)
    # Sample 0 is misclassified from the start: it keeps its random start.
    assert torch.allclose(out[0], start[0], atol=1e-6)
    # Sample 1 is right: two steps of 0.05 along sign(grad) (constant for a linear model), in the ball.
    p = torch.softmax(model(x[1:]), dim=1)[0].detach()
    grad = (p[0] * weight[0] + (p[1] - 1) * weight[1]).sign()
    expected = x[1] + (start[1] - x[1] + 2 * 0.05 * grad).clamp(-0.3, 0.3)
    assert torch.allclose(out[1], torch.where(holes[1], x[1], expected), atol=1e-5)


def test_factual_modes_share_one_signature_through_the_objective():
    batch = _batch()
    for f in FACTUAL_MODES:
        if f == "none":
            continue
        model = _conv_model(2)
        terms, _ = Objective(TrainConfig(f=f), torch.Generator().manual_seed(0), num_classes=2)(model, batch)
        assert terms["ce"].isfinite()


# ---------------------------------------------------------------- saliency scores and maps


def _linear_setup():
    torch.manual_seed(5)
    weight, bias = torch.randn(3, 3, 4, 4), torch.randn(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    return Linear(weight, bias), weight, x, torch.tensor([2, 0])


def test_score_gradients_of_a_linear_model():
    model, weight, x, y = _linear_setup()
    logits = model(x)
    p = torch.softmax(logits, dim=1).detach()
    expected_sum = weight.sum(dim=0).expand(2, -1, -1, -1)
    expected_logp_y = weight[y] - torch.einsum("bk,kchw->bchw", p, weight)
    expected_logp_sum = weight.sum(dim=0) - 3 * torch.einsum("bk,kchw->bchw", p, weight)
    cases = ((logit_sum, expected_sum), (target_log_prob, expected_logp_y), (log_prob_sum, expected_logp_sum))
    for score, expected in cases:
        got = input_gradient(model(x), x, y, score)
        assert torch.allclose(got, expected, atol=1e-5), score.__name__
        assert got.requires_grad  # create_graph: the penalty trains the weights


def test_deeplift_of_a_linear_model_is_input_times_weight():
    model, weight, x, y = _linear_setup()
    assert torch.allclose(deeplift(model, x, y), x.detach() * weight[y], atol=1e-5)


class TwoReLUs(nn.Module):
    """One ReLU module used twice, as torchvision ResNets do: out = c relu(b relu(w.x + a) + d)."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(3, 1), nn.Linear(1, 1), nn.Linear(1, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.head(self.relu(self.second(self.relu(self.first(x.flatten(1))))))


def test_deeplift_rescale_rule_by_hand_with_a_reused_relu():
    torch.manual_seed(6)
    model = TwoReLUs()
    with torch.no_grad():
        model.first.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model.first.bias.fill_(-0.5)
        model.second.weight.fill_(1.5)
        model.second.bias.fill_(0.25)
        model.head.weight.copy_(torch.tensor([[2.0], [-1.0]]))
    x = torch.tensor([[3.0, 0.5, 1.0]]).view(1, 3, 1, 1)
    relu = lambda v: max(v, 0.0)  # noqa: E731
    z1, z1_ref = 3.0 - 1.0 + 0.5 - 0.5, -0.5
    m1 = (relu(z1) - relu(z1_ref)) / (z1 - z1_ref)  # 2 / 2.5, not the gradient 1
    z2, z2_ref = 1.5 * relu(z1) + 0.25, 1.5 * relu(z1_ref) + 0.25
    m2 = (relu(z2) - relu(z2_ref)) / (z2 - z2_ref)
    expected = torch.tensor([3.0, 0.5, 1.0]) * torch.tensor([1.0, -2.0, 0.5]) * m1 * 1.5 * m2 * 2.0
    got = deeplift(model, x, torch.tensor([0]))
    assert torch.allclose(got.flatten(), expected, atol=1e-6)
    # DeepLift's completeness: attributions sum to f(x) - f(0) of the target.
    with torch.no_grad():
        gap = model(x)[0, 0] - model(torch.zeros_like(x))[0, 0]
    assert got.sum().item() == pytest.approx(gap.item(), rel=1e-5)


def test_deeplift_matches_captum_and_trains_the_weights():
    from captum.attr import DeepLift

    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip
    model[1].running_mean.uniform_(-0.5, 0.5)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    ours = deeplift(model.train(), x, y)
    assert model.training and model[1].training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = DeepLift(model.eval()).attribute(x, torch.zeros_like(x), target=y)
    assert torch.allclose(ours, reference, atol=1e-5)
    ours.square().sum().backward()
    # Every weight but the last bias (which no input attribution depends on) gets a gradient.
    assert all(p.grad.abs().sum() > 0 for p in list(model.parameters())[:-1]) and model[6].bias.grad is None


def test_grad_cam_by_hand_upsampled_to_the_input():
    torch.manual_seed(8)
    conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
    head = nn.Linear(2, 2)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    assert grad_cam_layer(model) is conv
    maps = grad_cam(model, x, y)
    # logit_y = sum_c head_yc mean_hw relu(A_c): d/dA_c = head_yc [A_c > 0] / 16; the map is
    # sum_c mean_hw(d/dA_c) A_c, then bilinear up to 8 x 8.
    a = conv(x).detach()
    d = head.weight.detach()[y][:, :, None, None] * (a > 0).float() / 16
    cam = (d.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
    expected = nn.functional.interpolate(cam, size=(8, 8), mode="bilinear")
    assert maps.shape == (2, 1, 8, 8)
    assert torch.allclose(maps, expected, atol=1e-6)
    maps.square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_attribution_penalties_have_the_finite_difference_gradient():
    # Smooth activations, float64: the penalty's gradient in the first layer's weights (which
    # move every multiplier and every Grad-CAM activation) equals the finite-difference slope.
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1), nn.Softplus(),
        nn.Flatten(), nn.Linear(2 * 36, 2),
    ).double()  # fmt: skip
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1])
    weight = model[0].weight
    direction = torch.randn_like(weight)
    for attribution in (deeplift, grad_cam):
        penalty = lambda: attribution(model, x, y).square().sum()  # noqa: E731
        weight.grad = None
        penalty().backward()
        with torch.no_grad():
            weight += 1e-6 * direction
            up = penalty()
            weight -= 2e-6 * direction
            down = penalty()
            weight += 1e-6 * direction
        slope = (up - down).item() / 2e-6
        assert (weight.grad * direction).sum().item() == pytest.approx(slope, rel=1e-5), attribution.__name__


def test_grad_cam_layer_prefers_the_models_own_choice():
    model = _conv_model(2)
    model.grad_cam_layer = lambda: model[2]
    assert grad_cam_layer(model) is model[2]


# ---------------------------------------------------------------- penalties


def test_bbox_f1_by_hand():
    # Two boxed images of 1 x 2 pixels, 2 channels; the box covers the left pixel.
    grads = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]], [[[2.0, 0.0]], [[0.0, 1.0]]]])
    holes = torch.tensor([[[[True, False]]], [[[True, False]]]])
    # sum_c g^2: image 0 -> (2, 1), image 1 -> (4, 1); batch min 1, max 4 -> (1/4, 0), (3/4, 0).
    f1_0 = 2 * 0.25 / (2 * 0.25 + 0 + 0.75)
    f1_1 = 2 * 0.75 / (2 * 0.75 + 0 + 0.25)
    penalty = bbox_f1_penalty(grads, holes, torch.tensor([True, True]))
    assert penalty.item() == pytest.approx(1 - (f1_0 + f1_1) / 2, rel=1e-6)
    only_second = bbox_f1_penalty(grads, holes, torch.tensor([False, True]))  # min 1, max 4 of image 1
    assert only_second.item() == pytest.approx(1 - 2 * 0.75 / (1.5 + 0.25), rel=1e-6)
    assert bbox_f1_penalty(torch.zeros_like(grads), holes, torch.tensor([True, True])).item() == 0.0


def test_gs_by_hand():
    grads = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 4.0]]]])
    x = torch.tensor([[[[2.0, 2.0]]], [[[1.0, 0.0]]]])
    x_cf = torch.tensor([[[[0.0, 2.0]]], [[[0.0, 1.0]]]])  # x - x_cf: (2, 0) and (1, -1)
    holes = torch.zeros(2, 1, 1, 2, dtype=torch.bool)
    cos_0 = 2.0 / (1.0 * 2.0 + 1e-8)
    cos_1 = (3.0 - 4.0) / (5.0 * math.sqrt(2) + 1e-8)
    penalty = gradient_supervision_penalty(grads, holes, torch.tensor([True, True]), inputs=x, counterfactuals=x_cf)
    assert penalty.item() == pytest.approx(((1 - cos_0) + (1 - cos_1)) / 2, rel=1e-6)
    second = gradient_supervision_penalty(grads, holes, torch.tensor([False, True]), inputs=x, counterfactuals=x_cf[1:])
    assert second.item() == pytest.approx(1 - cos_1, rel=1e-6)


def test_gs_counts_a_one_channel_map_once_per_colour_channel():
    # A grad_cam map [B, 1, H, W] against a 3-channel x - x_cf: aligned everywhere means cos 1.
    grads = torch.ones(1, 1, 2, 2)
    x, x_cf = torch.full((1, 3, 2, 2), 2.0), torch.ones(1, 3, 2, 2)
    holes = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    penalty = gradient_supervision_penalty(grads, holes, torch.tensor([True]), inputs=x, counterfactuals=x_cf)
    assert penalty.item() == pytest.approx(1 - 12 / (math.sqrt(12) * math.sqrt(12) + 1e-8), abs=1e-7)


def test_objective_gs_compares_the_input_gradient_with_x_minus_x_cf():
    batch, model = _batch(), _conv_model(2)
    terms, _ = Objective(TrainConfig(cf="tile", reg="gs", reg_coeff=2.0))(model, batch)
    x = normalize(batch.images).requires_grad_(True)
    logits = model(torch.cat([x, normalize(batch.cf["tile"])]))[:4]
    g = torch.autograd.grad(logits.gather(1, batch.labels[:, None]).sum(), x)[0]
    diff = x.detach() - normalize(batch.cf["tile"])
    cos = nn.functional.cosine_similarity(g.flatten(1), diff.flatten(1), dim=1, eps=0)
    assert terms["sal"].item() == pytest.approx(2.0 * (1 - cos).mean().item(), rel=1e-4)


def test_reg_anneal_ramps_lambda_per_epoch():
    batch = _batch()
    objective = Objective(TrainConfig(reg="bbox_o", reg_coeff=2.0, reg_anneal=4))
    full = Objective(TrainConfig(reg="bbox_o", reg_coeff=2.0))
    factors = []
    for epoch in range(6):
        objective.set_epoch(epoch)
        factors.append(objective.reg_factor)
    assert factors == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    objective.set_epoch(2)
    half = objective(_conv_model(2), batch)[0]["sal"]
    assert half.item() == pytest.approx(0.5 * full(_conv_model(2), batch)[0]["sal"].item(), rel=1e-5)


def test_reg_every_takes_the_penalty_on_every_kth_step_at_k_times_its_weight():
    objective = Objective(TrainConfig(reg="bbox_o", reg_every=3))
    assert objective.reg_now == 1.0  # a loop that never calls set_step: every step, plain weight
    weights = []
    for step in range(7):
        objective.set_step(step)
        weights.append(objective.reg_now)
    assert weights == [3.0, 0.0, 0.0, 3.0, 0.0, 0.0, 3.0]


def _weight_grads(model, loss):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # the last bias has no input gradient
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


@pytest.mark.parametrize("impl", ["exact", "finite-diff"])
def test_a_lazy_step_doubles_the_penalty_and_a_skipped_step_trains_as_without_it(impl):
    batch = _batch()
    every_step = Objective(TrainConfig(reg="bbox_o", reg_impl=impl))
    lazy = Objective(TrainConfig(reg="bbox_o", reg_impl=impl, reg_every=2))
    lazy.set_step(4)
    model = _conv_model(2)
    plain, doubled = every_step(model, batch)[0]["sal"], lazy(model, batch)[0]["sal"]
    assert doubled.item() == pytest.approx(2 * plain.item(), rel=1e-6)
    assert torch.allclose(_weight_grads(model, doubled), 2 * _weight_grads(model, plain), rtol=1e-5, atol=1e-8)
    lazy.set_step(5)
    skipped = lazy(model, batch)[0]
    assert skipped["sal"].item() == 0.0
    without = Objective(TrainConfig())(model, batch)[0]
    assert torch.equal(_weight_grads(model, sum(skipped.values())), _weight_grads(model, without["ce"]))


@pytest.mark.parametrize("epochs, anneal, ramp", [(15, "auto", 4), (20, "auto", 5), (3, "auto", 1), (2, "auto", 0),
                                                  (1, "auto", 0), (15, "0", 0), (15, "7", 7)])
def test_reg_anneal_auto_is_about_a_quarter_of_the_epochs_and_always_fewer(epochs, anneal, ramp):
    assert TrainConfig(epochs=epochs, reg_anneal=anneal).reg_anneal_epochs() == ramp


def test_the_default_ramp_reaches_full_weight_at_the_fifth_of_fifteen_epochs():
    objective = Objective(TrainConfig(reg="bbox_o", epochs=15))
    assert objective.reg_factor == 1.0  # a loop that never calls set_epoch keeps the full weight
    factors = []
    for epoch in range(6):
        objective.set_epoch(epoch)
        factors.append(objective.reg_factor)
    assert factors == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_a_run_recorded_with_a_numeric_reg_anneal_reads_back_as_text():
    recorded = {**TrainConfig().to_dict(), "reg_anneal": 3}
    config = TrainConfig.from_dict(recorded)
    assert config.reg_anneal == "3" and config.reg_anneal_epochs() == 3


# ---------------------------------------------------------------- baselines


def test_mixup_mixes_images_and_labels_with_one_lambda_and_a_permutation():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, partner, lam = mixup(images, labels, 0.2, torch.Generator().manual_seed(0))
    assert 0.0 < lam < 1.0
    assert sorted(partner.tolist()) == list(range(6))  # a permutation of the batch
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[partner], atol=1e-6)
    lams = [mixup(images, labels, 0.2, torch.Generator().manual_seed(s))[2] for s in range(200)]
    # Beta(0.2, 0.2) is U-shaped: mean 1/2, most mass near 0 and 1.
    assert sum(lams) / 200 == pytest.approx(0.5, abs=0.08)
    assert sum(min(v, 1 - v) < 0.1 for v in lams) > 100


def test_mixup_cross_entropy_and_label_smoothing_by_hand():
    logp = _log_softmax_rows(LOGITS.tolist())
    partner = torch.tensor([1, 0])
    got = mixup_cross_entropy(LOGITS, LABELS, partner, 0.3)
    expected = [0.3 * -logp[0][0] + 0.7 * -logp[0][1], 0.3 * -logp[1][2] + 0.7 * -logp[1][0]]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    smooth = mixup_cross_entropy(LOGITS, LABELS, LABELS, 1.0, label_smoothing=0.1)
    expected = [0.9 * -logp[i][y] + 0.1 * -sum(logp[i]) / 3 for i, y in enumerate((0, 2))]
    assert smooth.tolist() == pytest.approx(expected, rel=1e-6)


def test_objective_label_smoothing_and_mixup_ce():
    batch, model = _batch(), _conv_model(2)
    x = normalize(batch.images)
    terms, _ = Objective(TrainConfig(label_smoothing=0.2))(model, batch)
    logp = torch.log_softmax(model(x), dim=1)
    expected = (0.8 * -logp.gather(1, batch.labels[:, None])[:, 0] - 0.2 * logp.mean(dim=1)).mean()
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)

    terms, logits = Objective(TrainConfig(mixup=0.4), torch.Generator().manual_seed(9))(model, batch)
    mixed, partner_labels, lam = mixup(x, batch.labels, 0.4, torch.Generator().manual_seed(9))
    out = model(mixed)
    ce = nn.functional.cross_entropy
    expected = lam * ce(out, batch.labels) + (1 - lam) * ce(out, partner_labels)
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits, out, atol=1e-5)


def test_mixup_with_the_penalty_takes_the_gradient_on_the_unmixed_images():
    batch, model = _batch(), _conv_model(2)
    terms, _ = Objective(TrainConfig(mixup=0.4, reg="bbox_o", reg_measure="raw", reg_coeff=1.0), torch.Generator().manual_seed(9))(model, batch)
    x = normalize(batch.images).requires_grad_(True)
    mixed, _, _ = mixup(x.detach(), batch.labels, 0.4, torch.Generator().manual_seed(9))
    clean_logits = model(torch.cat([mixed, x]))[4:]  # the unmixed images ride along as extra rows
    holes = box_masks(batch.boxes, batch.box_valid, 16, 16)
    expected = bbox_outside_penalty(clean_logits, x, batch.labels, holes, torch.ones(4, dtype=torch.bool), target_logit)
    assert terms["sal"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["sal"].item() > 0


def test_grid_drop_mask_drops_the_expected_squares():
    period, zero = torch.tensor([10, 10]), torch.tensor([0.0, 0.0])
    mask = grid_drop_mask(20, 20, period, torch.tensor([0, 2]), torch.tensor([0, 3]), zero, keep_ratio=0.6)
    # Per period of 10, 6 rows and 6 columns are kept: 4 x 4 of every 10 x 10 dropped.
    for i, (r0, c0) in enumerate(((0, 0), (2, 3))):
        expected = torch.tensor([[(r - r0) % 10 >= 6 and (c - c0) % 10 >= 6 for c in range(20)] for r in range(20)])
        assert torch.equal(mask[i, 0], expected)
        assert mask[i].sum().item() == 64
    # A quarter turn maps the grid onto itself (rotated about the centre).
    turned = grid_drop_mask(20, 20, period[:1], torch.tensor([0]), torch.tensor([0]), torch.tensor([math.pi / 2]))
    assert turned.sum().item() == 64


def test_gridmask_masks_the_expected_fraction():
    images = torch.ones(400, 2, 64, 64)
    out = gridmask(images, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1])  # one mask for all channels
    assert set(out.unique().tolist()) == {0.0, 1.0}
    # Period d uniform in [27, 64) (96/224 of the side), (d - ceil(0.6 d))^2 / d^2 of each
    # masked image dropped, 80% of the images masked.
    periods = range(round(96 / 224 * 64), 64)
    expected = 0.8 * sum(((d - math.ceil(0.6 * d)) / d) ** 2 for d in periods) / len(periods)
    assert (out == 0).float().mean().item() == pytest.approx(expected, abs=0.015)
    untouched = (out == 1).flatten(1).all(dim=1).float().mean().item()
    assert untouched == pytest.approx(0.2, abs=0.06)


def test_objective_gridmask_masks_every_image_of_the_forward_pass():
    batch, model = _batch(), _conv_model(2)
    terms, logits = Objective(TrainConfig(gridmask=True, cf="tile"), torch.Generator().manual_seed(1))(model, batch)
    x = torch.cat([normalize(batch.images), normalize(batch.cf["tile"])])
    out = model(gridmask(x, torch.Generator().manual_seed(1)))
    assert terms["ce"].item() == pytest.approx(nn.functional.cross_entropy(out[:4], batch.labels).item(), rel=1e-5)
    assert torch.allclose(logits, out[:4], atol=1e-5)
