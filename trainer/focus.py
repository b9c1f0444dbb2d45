"""Saliency focus: the share of a model's input-gradient saliency that falls inside the boxes.

As the official `cal_saliency_focus.py` (its `norm_fg` figure, mode `grad`, target `y`): the
gradient of each sample's target-label logit with respect to the (normalised) input image, its
square summed over channels, then mass inside the box mask / total mass. A sample counts when
it has a box and a non-zero gradient (the official code would divide by zero).
"""

from __future__ import annotations

import numpy as np
import torch

from cfrobust.trainer.pixels import box_masks


def saliency_maps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] sum over channels of (d logit_y / d x)^2 for each sample's own label y.

    One backward pass for the batch: with the model in eval mode samples do not interact, so
    the gradient of the summed target logits holds each sample's own gradient.
    """
    inputs = images.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        (grads,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), inputs)
    return grads.square().sum(dim=1, keepdim=True)


def focus_of_maps(maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Per sample, mass of `maps` inside the bool mask / total mass (NaN when the total is 0)."""
    total = maps.sum(dim=(1, 2, 3))
    within = (maps * inside).sum(dim=(1, 2, 3))
    return torch.where(total > 0, within / total.clamp(min=torch.finfo(maps.dtype).tiny), torch.nan)


def batch_saliency_focus(model, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor, box_valid: torch.Tensor) -> np.ndarray:
    """Saliency focus of each sample of a batch of normalised images; NaN for samples without a
    box (they are not scored, so no gradient is spent on them) or with a zero gradient."""
    focus = np.full(len(labels), np.nan)
    has_box = box_valid.any(dim=1)
    if not has_box.any():
        return focus
    chosen = images[has_box]
    inside = box_masks(boxes[has_box], box_valid[has_box], chosen.shape[2], chosen.shape[3])
    maps = saliency_maps(model, chosen, labels[has_box])
    focus[has_box.cpu().numpy()] = focus_of_maps(maps, inside).cpu().numpy()
    return focus
