"""Every saliency mode under reduced precision, with both --reg-impl: bf16 autocast on the CPU,
fp16 autocast with the gradient scaler (on the CPU here, which the scaler supports, and on a GPU
where there is one)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cfrobust.errors import UserError
from cfrobust.trainer.config import REG_GRADS, TrainConfig
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.saliency import SALIENCY_SCORES
from cfrobust.trainer.train import Precision, check_fp16_saliency
from test_reg_impl import _batch, _model, _sal_gradient

MODES = [dict(reg="bbox_o"), dict(reg="bbox_o", reg_measure="raw"), dict(reg="bbox_f1"), dict(reg="gs")]


def _cases():
    for mode in MODES:
        for reg_grad in REG_GRADS:
            yield dict(mode, reg_grad=reg_grad, reg_impl="exact")
            if reg_grad in SALIENCY_SCORES:
                yield dict(mode, reg_grad=reg_grad, reg_impl="finite-diff")


def _fp16_allowed(options: dict) -> bool:
    try:
        check_fp16_saliency(TrainConfig(**options))
    except UserError:
        return False
    return True


def _train_steps(options: dict, precision: str, device: str, steps: int) -> None:
    """`steps` optimizer steps as optimizer_step takes them: every term finite, the weights finite,
    and at least one step taken (the fp16 scaler may skip the first while it finds its scale)."""
    device = torch.device(device)
    batch = _batch(n=4, size=16).to(device)
    config = TrainConfig(cf="tile", f="mrand", reg_coeff=0.5, object_region="box", **options)
    model = _model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    objective = Objective(config, torch.Generator(device).manual_seed(0), num_classes=2)
    scaled = Precision(precision, device)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with scaled.autocast():
            terms, _ = objective(model, batch)
        assert all(torch.isfinite(t) for t in terms.values()), (options, terms)
        scaled.backward(sum(terms.values()))
        scaled.step(optimizer)
    assert all(torch.isfinite(p).all() for p in model.parameters()), options
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), options


@pytest.mark.parametrize("options", list(_cases()), ids=lambda o: "-".join(map(str, o.values())))
def test_every_saliency_mode_trains_under_bf16_autocast(options):
    _train_steps(options, "bf16", "cpu", 2)


FP16_CASES = [options for options in _cases() if _fp16_allowed(options)]


@pytest.mark.parametrize("options", FP16_CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_the_saliency_modes_train_in_fp16_with_the_gradient_scaler(options):
    _train_steps(options, "16", "cpu", 4)


def _fp16_scaled_gradient(model, config, batch, state):
    """The Sal term's weight gradient under fp16 autocast, backpropagated at the loss scale a
    GradScaler settles on: 2^16 first, halved while the gradient is not finite."""
    scale = 2.0**16
    while scale >= 1:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            terms, _ = Objective(config, torch.Generator().manual_seed(0), num_classes=2)(model, batch)
        (terms["sal"] * scale).backward()
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
        if torch.isfinite(grads).all():
            return grads / scale
        scale /= 2
    raise AssertionError(f"{config.reg} {config.reg_impl}: no loss scale gives a finite gradient")


@pytest.mark.parametrize("options", FP16_CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_under_fp16_the_loss_scale_brings_back_the_fp32_gradient(options):
    """Every mode that --precision 16 accepts: at the first loss scale with a finite gradient, the
    penalty's weight gradient follows fp32's exact one (measured cosine 0.985-0.998, norm 0.96-1.06)."""
    config = TrainConfig(**options, cf="tile", reg_coeff=1.0, object_region="box")
    model = _model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, exact = _sal_gradient(model, replace(config, reg_impl="exact"), _batch())
    fp16 = _fp16_scaled_gradient(model, config, _batch(), state)
    assert F.cosine_similarity(exact, fp16, dim=0) >= 0.98
    assert fp16.norm() == pytest.approx(exact.norm().item(), rel=0.08)


def test_fp16_takes_the_gradient_scores_by_finite_differences_only():
    assert _fp16_allowed(dict(reg="gs", reg_impl="finite-diff", reg_grad="grad_sum"))
    assert not _fp16_allowed(dict(reg="bbox_o", reg_impl="exact"))  # overflows at every loss scale
    assert not _fp16_allowed(dict(reg="bbox_o", reg_grad="grad_cam"))
    assert not _fp16_allowed(dict(reg="bbox_o", reg_grad="deeplift"))
    assert _fp16_allowed(dict(reg="none", reg_grad="deeplift"))
    assert [len(FP16_CASES), len(list(_cases()))] == [16, 40]
