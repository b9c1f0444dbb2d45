"""--reg-impl finite-diff against the exact double backpropagation: the same penalty, the same
weight gradient up to the finite difference's error, the same running statistics."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.hvp import REG_IMPLS, ActivationPattern, step_size, value_and_direction
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.pixels import normalize
from cfrobust.trainer.saliency import SALIENCY_SCORES, outside_share_penalty


def _batch(n=8, size=32, boxed=None) -> Batch:
    torch.manual_seed(1)
    valid = torch.ones(n, 1, dtype=torch.bool) if boxed is None else boxed[:, None]
    return Batch(
        images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8),
        labels=torch.tensor([i % 2 for i in range(n)]),
        boxes=torch.tensor([[[6.0, 6.0, 22.0, 20.0]]] * n),
        box_valid=valid,
        cf={"tile": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)},
    )


def _model() -> nn.Module:
    """Four strided conv + BatchNorm + in-place ReLU blocks (batch coupling and kinks), small
    enough that these tests stay fast whatever the trainer's own simple-cnn grows to."""
    torch.manual_seed(0)
    layers, width = [], 3
    for out, stride in ((16, 2), (32, 2), (64, 2), (128, 1)):
        layers += [nn.Conv2d(width, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


def _sal_gradient(model: nn.Module, config: TrainConfig, batch: Batch):
    """The Sal term's value and its weight gradient (zeros where a weight gets none)."""
    model.zero_grad(set_to_none=True)
    terms, _ = Objective(config, torch.Generator().manual_seed(0), num_classes=2)(model, batch)
    terms["sal"].backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return terms["sal"].detach(), torch.cat([g.flatten() for g in grads])


def _exact_and_finite_difference(config: TrainConfig, model: nn.Module, batch: Batch):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = _sal_gradient(model, replace(config, reg_impl="exact"), batch)
    model.load_state_dict(state)
    finite = _sal_gradient(model, replace(config, reg_impl="finite-diff"), batch)
    return exact, finite


SAL_ONLY = [
    dict(reg="bbox_o"),
    dict(reg="bbox_o", reg_measure="raw"),
    dict(reg="bbox_f1"),
    dict(reg="bbox_o", reg_grad="grad_sum"),
    dict(reg="bbox_o", reg_grad="grad_logp_y"),
    dict(reg="bbox_o", reg_grad="grad_logp_sum", gridmask=True),
]


@pytest.mark.parametrize("options", SAL_ONLY)
def test_the_finite_difference_gradient_is_the_exact_one_on_a_batchnorm_relu_model(options):
    """Training-mode BatchNorm and ReLU, a fixed batch: cosine >= 0.99, the same value within 1%
    and the norm within 2% (fp32's step, 1e-2 of |x|, is sized against rounding, which dominates
    in a ResNet-50 after an epoch (trainer/hvp.py); on this fresh model truncation does, up to
    1.05% in the norm under log-softmax and GridMask)."""
    config = TrainConfig(**options, reg_coeff=1.0, object_region="box")
    (exact_value, exact), (value, finite) = _exact_and_finite_difference(config, _model().train(), _batch())
    assert value == pytest.approx(exact_value.item(), rel=1e-2)
    assert F.cosine_similarity(exact, finite, dim=0) >= 0.99
    assert finite.norm() == pytest.approx(exact.norm().item(), rel=2e-2)
    assert exact.norm() > 0


WITH_OTHER_ROWS = [
    dict(reg="gs", cf="tile"),
    dict(reg="bbox_o", cf="tile", f="mrand", reg_grad="grad_logp_y"),
    dict(reg="bbox_o", mixup=0.4),
    dict(reg="bbox_f1", f="random", gridmask=True),
]


@pytest.mark.parametrize("options", WITH_OTHER_ROWS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_with_factual_counterfactual_or_mixed_rows_the_gradient_is_the_exact_one(options, mode):
    """finite-diff runs every row as one batch, as the exact step: with BatchNorm on batch
    statistics (rows coupled) and on running statistics alike, it has the exact weight gradient."""
    config = TrainConfig(**options, reg_coeff=1.0, object_region="box", cf_online=True)
    model = _model().train(mode == "train")
    (exact_value, exact), (value, finite) = _exact_and_finite_difference(config, model, _batch())
    assert value == pytest.approx(exact_value.item(), rel=1e-4)
    assert F.cosine_similarity(exact, finite, dim=0) >= 0.99
    assert finite.norm() == pytest.approx(exact.norm().item(), rel=1e-2)
    assert exact.norm() > 0


def test_the_running_statistics_are_updated_once_from_every_row():
    model = _model().train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    config = TrainConfig(reg="bbox_o", cf="tile", object_region="box", cf_online=False, reg_impl="finite-diff")
    batch = _batch()
    Objective(config, torch.Generator().manual_seed(0), num_classes=2)(model, batch)
    assert [int(m.num_batches_tracked) for m in norms] == [1] * len(norms)
    # The first layer's running mean moved by momentum x the batch mean of x's and the
    # counterfactuals' rows (x's moved by h v, a step of 0.1% of |x|), as one exact pass does.
    alone = _model().train()
    joint = _model().train()
    with torch.no_grad():
        alone[0:2](normalize(batch.images))
        joint[0:2](torch.cat([normalize(batch.images), normalize(batch.cf["tile"])]))
    torch.testing.assert_close(norms[0].running_mean, joint[1].running_mean, rtol=1e-2, atol=1e-5)
    assert not torch.allclose(norms[0].running_mean, alone[1].running_mean, rtol=1e-2, atol=1e-5)


def test_samples_without_boxes_give_zero_penalty_and_zero_gradient():
    model = _model().train()
    config = TrainConfig(reg="bbox_o", object_region="box", reg_impl="finite-diff", reg_coeff=1.0)
    value, grad = _sal_gradient(model, config, _batch(boxed=torch.zeros(8, dtype=torch.bool)))
    assert value == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("reg_grad", ["deeplift", "grad_cam"])
def test_attribution_maps_have_no_finite_difference_form(reg_grad):
    with pytest.raises(UserError, match="--reg-impl finite-diff .* --reg-grad " + reg_grad):
        Objective(TrainConfig(reg="bbox_o", reg_grad=reg_grad, reg_impl="finite-diff"))


def test_the_option_offers_the_implementations_that_exist():
    (option,) = [f for f in fields(TrainConfig) if f.name == "reg_impl"]
    assert option.metadata["choices"] == REG_IMPLS
    assert option.default == "exact"
    assert TrainConfig.from_dict({}).reg_impl == "exact"  # runs made before the option were exact


def test_the_step_is_eps_times_the_input_and_a_zero_direction_makes_none():
    x = torch.full((2, 3, 4, 4), 2.0)
    v = torch.full((2, 3, 4, 4), 0.5)
    step, inverse = step_size(x, v, 1e-3)
    assert (step * v).norm() == pytest.approx(1e-3 * x.norm().item(), rel=1e-6)
    assert inverse == pytest.approx(1 / step.item(), rel=1e-6)
    step, inverse = step_size(x, torch.zeros_like(v), 1e-3)
    assert inverse == 0.0 and torch.isfinite(step) and torch.equal(step * torch.zeros_like(v), torch.zeros_like(v))


def test_the_direction_is_the_penalty_gradient_in_g():
    """share = sum((1-m) g^2) / sum(g^2): d/dg = 2 g ((1-m) - share) / sum(g^2), hand-computed."""
    g = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]]]])
    holes = torch.tensor([[[[True, False], [False, True]]]])
    value, v = value_and_direction(outside_share_penalty, g, holes, torch.tensor([True]))
    assert value == pytest.approx(4.0 / 6.0)
    expected = 2 * g * ((~holes).float() - 4.0 / 6.0) / 6.0
    torch.testing.assert_close(v, expected)


class _Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return F.relu(self.act(self.conv(x)) - 0.1).sum(dim=(2, 3))


def test_the_activation_pattern_holds_module_and_functional_relus():
    model = _Both()
    x = torch.randn(2, 1, 5, 5)
    pattern = ActivationPattern()
    with pattern:
        out = model(x)
    first = F.relu(model.conv(x))
    # The records are the ReLUs' outputs, detached: positive exactly where the unit passes.
    assert len(pattern.records) == 2 and not pattern.records[0].requires_grad
    torch.testing.assert_close(pattern.records[0], first)
    with pattern.replay():
        torch.testing.assert_close(model(x), out)  # the same input: the same output
    with pattern.replay():
        moved = model(x + 10.0)  # far off: every unit keeps its recorded on/off state
    with pattern.replay(), pytest.raises(RuntimeError, match="more ReLU calls"):
        model(x), model(x)
    conv = model.conv(x + 10.0)
    held = ((conv * (pattern.records[0] > 0)) - 0.1) * (pattern.records[1] > 0)
    torch.testing.assert_close(moved, held.sum(dim=(2, 3)))


@pytest.mark.parametrize("reg_grad", list(SALIENCY_SCORES))
@pytest.mark.parametrize("reg", ["bbox_o", "bbox_f1", "gs"])
def test_every_penalty_and_score_trains_two_steps_by_finite_differences(reg, reg_grad):
    batch = _batch(n=4, size=16)
    for options in ({}, {"f": "mrand"}, {"reg_measure": "raw"}):
        config = TrainConfig(cf="tile", reg=reg, reg_grad=reg_grad, reg_impl="finite-diff", reg_coeff=0.5,
                             object_region="box", **options)
        model = _model().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        objective = Objective(config, torch.Generator().manual_seed(0), num_classes=2)
        before = model[0].weight.detach().clone()
        for _ in range(2):
            terms, logits = objective(model, batch)
            assert set(terms) == {"ce", "cf", "sal"}
            assert all(torch.isfinite(t) for t in terms.values()), terms
            assert logits.shape == (4, 2)
            optimizer.zero_grad()
            sum(terms.values()).backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            optimizer.step()
        assert not torch.equal(model[0].weight, before)
