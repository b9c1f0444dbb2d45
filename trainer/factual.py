"""Factual augmentation: keep the object, replace its background; the label stays y.
Every mode is fn(images, holes, labels, generator, model=None, config=None, rects=None) -> new images.
"""

# Inputs are the normalised images of the boxed samples and `holes`, True on their object region
# (the mask, or the boxes); `rects` are the boxes' rectangles (mrand removes a partner's object
# by them); only fgsm/pgd use the model and the config. Meanings follow the official code:
# zzzace2000/robust_cls_model, arch/lightning/base.py `get_inpainting_model`,
# arch/inpainting/Baseline.py and arch/inpainting/AdvInpainting.py.

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfrobust.trainer.fills import online_random, online_tile, pixel_units, to_normalized
from cfrobust.trainer.module_modes import evaluation_mode, unwrap
from cfrobust.trainer.pixels import blended_edge, erode, normalized_range


def batch_partner(labels: torch.Tensor, generator: torch.Generator | None = None, rule: str = "other-class") -> torch.Tensor:
    """For each sample, a random other sample of the batch: of another class (other-class), of its
    own class (same-class) or either (any). Where the rule has no one to offer, any other sample;
    itself only in a batch of one."""
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    preferred = {"other-class": ~same, "same-class": same, "any": torch.zeros_like(same)}[rule]
    noise = torch.rand(n, n, generator=generator, device=labels.device)
    return (noise + 2 * preferred.float() - 4 * torch.eye(n, device=labels.device)).argmax(dim=1)


def pasted_region(region: torch.Tensor, rects: torch.Tensor, images: torch.Tensor, config) -> torch.Tensor:
    """The part of the object region (a mask, else the boxes' rectangles `rects`) that a factual
    keeps of `images` (normalised). A mask's edge pixels carry some of the image's own background,
    from blur, JPEG or the threshold that made the mask, and pasted as they are they tell the
    place, hence the label: --f-erode drops just the edge pixels whose colour mixes the object's
    and the background's (blend), or shrinks the mask by whole pixels. A sample whose region is
    its rectangles (no mask) keeps them as they are."""
    if region is rects:  # a batch without masks (comparing values would wait on the GPU every step)
        return region
    if config.f_erode == "blend":
        kept = region & ~blended_edge(pixel_units(images.float()), region)
    else:
        pixels = config.f_erode_pixels(min(region.shape[-2], region.shape[-1]))
        if pixels == 0:  # the mask as it is (every preset, other-class partners): nothing to keep apart
            return region
        kept = erode(region, pixels)
    boxes_only = (region == rects).flatten(1).all(dim=1)[:, None, None, None]
    return torch.where(boxes_only, region, kept)


def mrand(images, holes, labels, generator=None, model=None, config=None, rects=None) -> torch.Tensor:
    """The object (by its region) on the real background of another image of the batch, whose own
    object is tile-filled (its boxes' rectangles as the hole) so that its shape does not come along.

    Whose background: --f-partner. other-class (official `mrand`, FactualMixedRandomTileInpainter)
    takes an image of another class; with a single class in the batch there is none, and the
    background stays 0. any takes any other image: a model that learns to spot a pasted object
    cannot then read the label as "the other class's background", which is exactly what the
    other-class rule teaches it when backgrounds follow the label (README, On data nobody tuned for).
    """
    partner_rule = "other-class" if config is None else config.f_partner
    if partner_rule == "auto":
        raise ValueError("--f-partner auto depends on the number of classes: construct Objective with num_classes")
    if len(labels) < 2 or (partner_rule == "other-class" and bool((labels == labels[0]).all())):
        return images.masked_fill(~holes, 0.0)
    partner = batch_partner(labels, generator, partner_rule)
    return torch.where(holes, images, online_tile(images, holes if rects is None else rects)[partner])


def random_background(images, holes, labels, generator=None, model=None, config=None, rects=None) -> torch.Tensor:
    """random: a per-image random colour plus noise everywhere but the object: the `random` fill
    applied to the complement of the hole (official RandomColorWithNoiseInpainter as f_inpaint)."""
    return online_random(images, ~holes, generator)


def shuffled_background(images, holes, labels, generator=None, model=None, config=None, rects=None) -> torch.Tensor:
    """shuffle: the background made of the batch's values in random order.

    The official ShuffleInpainter permutes x.reshape(-1) of the whole batch it is given (the
    boxed images): values move across pixels, channels *and* images, so no image keeps its own
    background colours. Same here, permuted in [0, 1] pixel units because our normalisation
    differs per channel (the official one, mean = std = 0.5, does not).
    """
    pixels = pixel_units(images).flatten()
    order = torch.randperm(pixels.numel(), generator=generator, device=images.device)
    return torch.where(holes, images, to_normalized(pixels[order].view_as(images)))


def fgsm(images, holes, labels, generator=None, model=None, config=None, rects=None) -> torch.Tensor:
    """fgsm: x + eps * sign(d CE / dx) outside the object, kept within the valid pixel range.

    Textbook FGSM from x. (The official AdvInpainting's fgsm starts from a uniform random delta and
    steps 1.25 eps before clipping to eps, the "fast FGSM" of Wong et al. 2020.)
    """
    _, grad = _loss_gradient(model, images, labels)
    return _project(images, images + config.f_eps * grad.sign(), holes, config.f_eps)


def pgd(images, holes, labels, generator=None, model=None, config=None, rects=None) -> torch.Tensor:
    """pgd: random start in the eps-ball, then f_steps signed steps of f_alpha (0: eps / 4), each
    projected back to the ball, the pixel range and the background.

    As the official AdvInpainting, a sample stops moving once the model misclassifies it.
    """
    eps = config.f_eps
    alpha = config.f_alpha or eps / 4
    start = (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * eps
    adversarial = _project(images, images + start, holes, eps)
    for _ in range(config.f_steps):
        logits, grad = _loss_gradient(model, adversarial, labels)
        still_right = (logits.argmax(dim=1) == labels).to(grad.dtype)[:, None, None, None]
        adversarial = _project(images, adversarial + alpha * grad.sign() * still_right, holes, eps)
    return adversarial


def _loss_gradient(model, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and d CE_sum / d images on a detached copy, with every module in eval mode (the
    official attack runs under advertorch's ctx_noparamgrad_and_eval): BatchNorm uses its running
    statistics and does not update them, and nothing joins the training graph."""
    if model is None:
        raise ValueError("fgsm/pgd factuals need the model")
    bare = unwrap(model)
    with evaluation_mode(bare), torch.enable_grad():
        inputs = images.detach().requires_grad_(True)
        logits = bare(inputs)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), labels, reduction="sum"), inputs)
    return logits.detach(), grad


def _project(images: torch.Tensor, candidate: torch.Tensor, holes: torch.Tensor, eps: float) -> torch.Tensor:
    """candidate pulled back into the L-inf eps-ball around images and the valid pixel range; the
    object (holes) keeps its pixels exactly."""
    low, high = normalized_range(images.device, images.dtype)
    inside_ball = images + (candidate - images).clamp(-eps, eps)
    return torch.where(holes, images, torch.maximum(torch.minimum(inside_ball, high), low)).detach()


FACTUAL_MODES = {
    "random": random_background,
    "shuffle": shuffled_background,
    "mrand": mrand,
    "fgsm": fgsm,
    "pgd": pgd,
}
