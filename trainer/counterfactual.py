"""Counterfactual losses: on an image whose object was removed, the model must not be sure of y.
Each takes the counterfactuals' logits and their original labels y.
"""

# Names and meanings follow the official code: zzzace2000/robust_cls_model,
# arch/lightning/base.py, `counterfactual_ce_loss`.

from __future__ import annotations

import torch
import torch.nn.functional as F


def logp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean of -log(1 - p_y(x_cf)); for two classes, cross-entropy towards the other class.

    log(1 - p_y) = logsumexp over k != y of the logits - logsumexp over all, which stays finite
    even when p_y rounds to 1.
    """
    is_label = F.one_hot(labels, logits.shape[1]).bool()
    log_not_y = torch.logsumexp(logits.masked_fill(is_label, float("-inf")), dim=1) - torch.logsumexp(logits, dim=1)
    return -log_not_y.mean()


def uniform_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """uni: cross-entropy to the uniform distribution over the K classes, -mean_k log p_k."""
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


def uniform_except_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """uni_e: cross-entropy to the uniform distribution over the K - 1 classes other than y."""
    log_p = F.log_softmax(logits, dim=1)
    others = 1.0 - F.one_hot(labels, logits.shape[1]).to(log_p.dtype)
    return -(others * log_p).sum(dim=1).div(logits.shape[1] - 1).mean()


def channels_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """channels: the model has 2K outputs and output y + K means "the background of class y";
    the counterfactual is trained towards it with plain cross-entropy over all 2K outputs."""
    return F.cross_entropy(logits, labels + logits.shape[1] // 2)


CF_LOSSES = {
    "logp": logp_loss,
    "uni": uniform_loss,
    "uni_e": uniform_except_label_loss,
    "channels": channels_loss,
}


def output_size(num_classes: int, cf_loss: str) -> int:
    """Outputs the model needs: 2K for `channels` (K object classes + K backgrounds), else K.
    Only the first K outputs are class scores; evaluation slices logits[:, :K]."""
    return 2 * num_classes if cf_loss == "channels" else num_classes


def class_logits(logits: torch.Tensor, cf_loss: str) -> torch.Tensor:
    """The K class scores among the model's outputs (drops the background outputs of `channels`)."""
    return logits[:, : logits.shape[1] // 2] if cf_loss == "channels" else logits
