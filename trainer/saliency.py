"""The saliency penalty: input gradients outside the object's boxes are punished.

g = d score / d x is taken with create_graph=True so the penalty itself is differentiable; the
caller adds it to the total loss and calls .backward() once (the DDP-safe form, CRAFT.md).
"""

from __future__ import annotations

import torch


def target_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad_y: the sum over samples of each sample's own target logit."""
    return logits.gather(1, labels[:, None]).sum()


SALIENCY_SCORES = {"grad_y": target_logit}


def bbox_outside_penalty(
    logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, holes: torch.Tensor, has_box: torch.Tensor, score
) -> torch.Tensor:
    """bbox_o: mean of (g * (1 - m))^2 over the samples that have boxes (0 if none do)."""
    (grads,) = torch.autograd.grad(score(logits, labels), inputs, create_graph=True)
    outside = (~holes & has_box[:, None, None, None]).to(grads.dtype)
    elements = has_box.sum().clamp(min=1) * grads[0].numel()
    return (grads * outside).square().sum() / elements


REGULARIZERS = {"bbox_o": bbox_outside_penalty}
