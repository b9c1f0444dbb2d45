"""Counterfactual losses: on an image whose object was removed, the model must not be sure of y."""

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


CF_LOSSES = {"logp": logp_loss}
