"""The training loss of one batch: CE(x and x_f) + cf_coeff * CF(x_cf) + reg_coeff * Sal(x).

All images of a step (originals, factuals, counterfactuals) go through the model in one forward
pass. Samples without boxes contribute to the CE term only (plain ERM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfrobust.shards.reader import Batch
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.counterfactual import CF_LOSSES
from cfrobust.trainer.factual import FACTUAL_MODES
from cfrobust.trainer.fills import ONLINE_FILLS
from cfrobust.trainer.pixels import box_masks, normalize
from cfrobust.trainer.saliency import REGULARIZERS, SALIENCY_SCORES


class Objective:
    def __init__(self, config: TrainConfig, generator: torch.Generator | None = None):
        self.config = config
        self.generator = generator
        self.cf_loss = CF_LOSSES[config.cf_loss] if config.cf != "none" else None
        self.factual = FACTUAL_MODES[config.f] if config.f != "none" else None
        self.regularizer = REGULARIZERS[config.reg] if config.reg != "none" else None
        self.score = SALIENCY_SCORES[config.reg_grad]

    def __call__(self, model, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms by name (already weighted; their sum is the loss) and the logits of x."""
        x = normalize(batch.images)
        y = batch.labels
        holes = box_masks(batch.boxes, batch.box_valid, x.shape[2], x.shape[3])
        has_box = batch.box_valid.any(dim=1)
        if self.regularizer is not None:
            x.requires_grad_(True)
        inputs, targets = [x], [y]
        if self.factual is not None:
            x_f = self.factual(x.detach(), holes, y, self.generator)
            inputs.append(x_f[has_box])
            targets.append(y[has_box])
        if self.cf_loss is not None:
            inputs.append(self._counterfactuals(x.detach(), holes, has_box, batch))
        logits = model(torch.cat(inputs))
        n_ce = sum(len(t) for t in targets)
        terms = {"ce": F.cross_entropy(logits[:n_ce], torch.cat(targets))}
        if self.cf_loss is not None:
            terms["cf"] = self.config.cf_coeff * self._mean_or_zero(self.cf_loss, logits[n_ce:], y[has_box])
        logits_x = logits[: len(y)]
        if self.regularizer is not None:
            penalty = self.regularizer(logits_x, x, y, holes, has_box, self.score)
            terms["sal"] = self.config.reg_coeff * penalty
        return terms, logits_x.detach()

    def _counterfactuals(self, x, holes, has_box, batch: Batch) -> torch.Tensor:
        """The boxed samples with their object removed: filled here (--cf-online) or read from the shards."""
        if self.config.cf_online:
            return ONLINE_FILLS[self.config.cf](x[has_box], holes[has_box], self.generator)
        return normalize(batch.cf[self.config.cf])[has_box]

    @staticmethod
    def _mean_or_zero(loss, logits, labels):
        # A batch without any boxed sample has no counterfactuals; the term is then exactly 0
        # but stays attached to the graph so every rank runs the same backward.
        return loss(logits, labels) if len(labels) else logits.sum() * 0.0
