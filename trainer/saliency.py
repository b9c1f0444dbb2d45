"""The saliency penalty: the model's saliency map g is punished where it disagrees with the boxes.
g = d score / d x (or an attribution map, trainer/attributions.py), differentiable in the weights.
"""

# g is taken with create_graph=True; the caller adds the penalty to the total loss and calls
# .backward() once (the DDP-safe form, CRAFT.md). Penalties follow the official code
# (zzzace2000/robust_cls_model, arch/lightning/base.py `training_step`; scores:
# arch/saliency_utils.py), except that per-sample scores use each sample's own target.

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_y: the sum over samples of each sample's own target logit (DESIGN §5; the official
    logits[:, y].sum() sums every sample's logit of every label in the batch)."""
    return logits.gather(1, labels[:, None]).sum()


def logit_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_sum: the sum of all logits."""
    return logits.sum()


def target_log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_logp_y: the sum over samples of log p_y, each sample's own target."""
    return F.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()


def log_prob_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_logp_sum: the sum of all log-probabilities ("right for the right reasons", 2017)."""
    return F.log_softmax(logits, dim=1).sum()


SALIENCY_SCORES = {
    "grad_y": target_logit,
    "grad_sum": logit_sum,
    "grad_logp_y": target_log_prob,
    "grad_logp_sum": log_prob_sum,
}


def input_gradient(logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, score,
                   scale: float = 1.0) -> torch.Tensor:
    """d score(logits, labels) / d inputs, itself differentiable in the model's weights. `scale`
    multiplies the score for the backward and divides g after it (fp16 autocast: a map of small
    per-pixel gradients would underflow in an fp16 backward)."""
    if scale == 1:
        (grads,) = torch.autograd.grad(score(logits, labels), inputs, create_graph=True)
        return grads
    (grads,) = torch.autograd.grad(score(logits, labels) * scale, inputs, create_graph=True)
    return grads / scale


def outside_box_penalty(grads: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, **_) -> torch.Tensor:
    """bbox_o: mean of (g * (1 - m))^2 over the samples that have boxes (0 if none do)."""
    outside = (~holes & has_box[:, None, None, None]).to(grads.dtype)
    elements = has_box.sum().clamp(min=1) * grads[0].numel()
    return (grads * outside).square().sum() / elements


def outside_share_penalty(grads: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, **_) -> torch.Tensor:
    """bbox_o as a share: per boxed sample, the saliency energy outside the object over its whole
    energy, sum((g * (1 - m))^2) / sum(g^2), averaged over the boxed samples (0 if none do).

    A share in [0, 1] does not change when g is scaled, so one weight means the same at any
    resolution, normalisation, architecture or stage of training, where the raw mean of g^2 spans
    orders of magnitude. An all-zero map counts as 0."""
    energy = grads.square()
    outside = (energy * (~holes).to(energy.dtype)).flatten(1).sum(dim=1)
    total = energy.flatten(1).sum(dim=1)
    share = outside / total.clamp(min=torch.finfo(energy.dtype).tiny)
    return (share * has_box.to(share.dtype)).sum() / has_box.sum().clamp(min=1)


def bbox_f1_penalty(grads: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, **_) -> torch.Tensor:
    """bbox_f1: 1 - soft F1 between the saliency map and the box mask, as the official code.

    The map is sum_c g^2, shifted by its minimum and divided by its maximum, both taken over the
    whole batch of boxed samples (not per image, and by max, not max - min, as the official
    code); F1 = 2TP / (2TP + FP + FN) with soft counts per image, averaged over images. A map
    that is zero everywhere gives 0, as the official code's all-zero-gradient guard.
    """
    saliency = grads[has_box].square().sum(dim=1, keepdim=True)
    if len(saliency) == 0:
        return grads.sum() * 0.0
    top = saliency.max()
    saliency = (saliency - saliency.min()) / torch.where(top > 0, top, torch.ones_like(top))
    truth = holes[has_box].to(saliency.dtype)
    dims = (1, 2, 3)
    true_pos = (saliency * truth).sum(dim=dims)
    false_pos = (saliency * (1 - truth)).sum(dim=dims)
    false_neg = ((1 - saliency) * truth).sum(dim=dims)
    f1 = (2 * true_pos / (2 * true_pos + false_pos + false_neg).clamp(min=torch.finfo(saliency.dtype).tiny)).mean()
    return torch.where(top > 0, 1 - f1, torch.zeros_like(f1))


def gradient_supervision_penalty(
    grads: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, inputs=None, counterfactuals=None, **_
) -> torch.Tensor:
    """gs (gradient supervision, Teney et al. 2020): mean over boxed samples of 1 - cos(g, x - x_cf),
    so the gradient points from the counterfactual towards the image (official `reg == 'gs'`).

    cos = <g, d> / (|g| |d| + 1e-8) per image; an all-zero g over the batch gives 0 as the official
    guard. (The official code pairs the gradients of *all* images with the boxed images'
    differences, which only lines up when every image has a box; we take the boxed images' g.)
    """
    if counterfactuals is None:
        raise ValueError("the gs penalty needs the counterfactual images (--cf)")
    g = grads[has_box]
    if len(g) == 0:
        return grads.sum() * 0.0
    diff = inputs[has_box] - counterfactuals
    g = g.expand_as(diff)  # a one-channel map (grad_cam) counts once per colour channel, so |cos| <= 1
    dims = tuple(range(1, g.ndim))
    cosine = (g * diff).sum(dim=dims) / (g.square().sum(dim=dims).sqrt() * diff.square().sum(dim=dims).sqrt() + 1e-8)
    loss = (1 - cosine).mean()
    return torch.where((g != 0).any(), loss, torch.zeros_like(loss))


def bbox_outside_penalty(
    logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, score
) -> torch.Tensor:
    """bbox_o of the input gradient of score(logits) in one call."""
    return outside_box_penalty(input_gradient(logits, inputs, labels, score), holes, has_box)


REGULARIZERS = {
    "bbox_o": outside_box_penalty,
    "bbox_f1": bbox_f1_penalty,
    "gs": gradient_supervision_penalty,
}
