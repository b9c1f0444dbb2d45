"""The training loss of one batch: CE(x and x_f) + cf_coeff * CF(x_cf) + lambda * Sal(x).
All images of a step go through the model as one batch (--reg-impl finite-diff: twice); samples
without boxes are ERM.
"""

# Baselines combine with the method's terms: label smoothing applies to the CE of x and x_f;
# GridMask to every image of the forward pass (as the official code, which masks inside
# forward); mixup replaces x by its mix in the CE term only, so x_f and x_cf are built from, and
# the saliency penalty taken on, the unmixed images (which then join the forward pass as extra
# rows). The official code runs mixup and label smoothing only alone.

from __future__ import annotations

import torch
import torch.nn.functional as F

from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.attributions import deeplift, grad_cam
from cfrobust.trainer.baselines import gridmask, mixup, mixup_cross_entropy
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.counterfactual import CF_LOSSES, class_logits
from cfrobust.trainer.factual import FACTUAL_MODES, pasted_region
from cfrobust.trainer.fills import ONLINE_FILLS
from cfrobust.trainer.hvp import (
    STEP_EPS,
    ActivationPattern,
    autocast_dtype,
    finite_difference_term,
    push_forward,
    score_scale,
    step_size,
    value_and_direction,
)
from cfrobust.trainer.module_modes import running_statistics_frozen, unwrap
from cfrobust.trainer.pixels import box_masks, normalize
from cfrobust.trainer.saliency import REGULARIZERS, SALIENCY_SCORES, input_gradient, outside_share_penalty

ATTRIBUTIONS = {"deeplift": deeplift, "grad_cam": grad_cam}


def regularizer(config: TrainConfig):
    """The saliency penalty of --reg, bbox_o measured as --reg-measure says (None: no penalty)."""
    if config.reg == "bbox_o" and config.reg_measure == "share":
        return outside_share_penalty
    return REGULARIZERS[config.reg] if config.reg != "none" else None


class Objective:
    def __init__(self, config: TrainConfig, generator: torch.Generator | None = None,
                 group_weights: dict[str, float] | None = None, num_classes: int | None = None):
        # --f-partner, --f-weight and --f-erode auto resolve by the number of classes; without it,
        # --f-weight auto reads it from the logits' width, and mrand and the mask refuse auto.
        self.config = config.with_factual_pairing(num_classes) if num_classes else config
        self.generator = generator
        self.group_weights = group_weights  # --balance-groups: CE weight of an image by its group
        self.cf_loss = CF_LOSSES[config.cf_loss] if config.cf != "none" else None
        self.factual = FACTUAL_MODES[config.f] if config.f != "none" else None
        self.regularizer = regularizer(config)
        self.score = SALIENCY_SCORES.get(config.reg_grad)
        self.attribution = ATTRIBUTIONS.get(config.reg_grad)
        if config.reg == "gs" and config.cf == "none":
            raise UserError("--reg gs aligns the gradient with x - x_cf: it needs a counterfactual (--cf)")
        self.finite_difference = config.reg_impl == "finite-diff" and self.regularizer is not None
        if self.finite_difference and self.score is None:
            raise UserError(f"--reg-impl finite-diff differentiates an input gradient of a score; --reg-grad "
                            f"{config.reg_grad} is not one: use --reg-impl exact or one of "
                            f"{', '.join(SALIENCY_SCORES)}")
        # Full weight until set_epoch is called: a loop of one's own that never calls it (it
        # counts steps, not epochs) gets the penalty it asked for, not a ramp stuck at 0.
        self.reg_factor = 1.0
        self.reg_now = 1.0  # this step's multiple of the penalty's weight (--reg-every; 0: skipped)

    def set_step(self, step: int) -> None:
        """Call before each optimizer step (0-based count of steps), as `cfrobust train` does:
        under --reg-every K the penalty is taken on steps 0, K, 2K, ... at K times its weight and
        skipped on the others, so every rank and every --batch-split chunk of a step agree. A loop
        that never calls it takes the penalty on every step at its plain weight."""
        every = self.config.reg_every
        self.reg_now = float(every) if step % every == 0 else 0.0

    def set_epoch(self, epoch: int) -> None:
        """Call at the start of each epoch (0-based), as `cfrobust train` does: lambda ramps
        linearly from 0 at epoch 0 to reg_coeff at epoch reg_anneal (auto: about a quarter of the
        epochs). (The official code ramps per step over a fraction of training and does not stop
        at 1.)"""
        anneal = self.config.reg_anneal_epochs()
        self.reg_factor = min(1.0, epoch / anneal) if anneal > 0 else 1.0

    def __call__(self, model, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Loss terms by name (already weighted; their sum is the loss) and the class logits of x
        (of the mixed x under mixup; the first K outputs under cf_loss channels)."""
        config = self.config
        x = normalize(batch.images)
        y = batch.labels
        # Plain ERM needs neither the holes nor which samples have boxes: skip the work.
        needs_boxes = self.counts_boxes
        holes = box_masks(batch.boxes, batch.box_valid, x.shape[2], x.shape[3]) if needs_boxes else None
        has_box = batch.box_valid.any(dim=1) if needs_boxes else None
        # F keeps and Sal rewards the object region (the mask when the batch has one); CF always
        # removes the boxes' rectangles, so a counterfactual's hole does not show the object's shape.
        region = batch.masks if needs_boxes and batch.masks is not None else holes
        mixed = mixup(x, y, config.mixup, self.generator) if config.mixup > 0 else None
        penalize = self.regularizer is not None and self.reg_now > 0
        if penalize and self.score is not None:
            x.requires_grad_(True)  # the input gradient is taken on the unmixed images
        rows = self._rows(model, batch, x, y, holes, region, has_box, mixed)
        if penalize and self.finite_difference:
            logits, penalty = self._forward_with_finite_differences(model, rows, x, y, region, has_box)
        else:
            logits = self._forward(model, rows)

        terms = {"ce": self._cross_entropy(logits, y, has_box, mixed, batch.groups)}
        if self.cf_loss is not None:
            terms["cf"] = config.cf_coeff * self._mean_or_zero(self.cf_loss, logits["cf"], y[has_box])
        if penalize and not self.finite_difference:
            grads = self._saliency(model, x, y, logits.get("x_sal", logits["x"]))
            penalty = self.regularizer(grads, region, has_box, inputs=x.detach(), counterfactuals=rows.get("cf"))
        if self.regularizer is not None:
            # A skipped step (--reg-every) logs 0: the term's mean over steps is its weight in training.
            weight = config.reg_coeff * self.reg_factor * self.reg_now
            terms["sal"] = weight * penalty if penalize else x.new_zeros(())
        return terms, class_logits(logits["x"], config.cf_loss).detach()

    @property
    def counts_boxes(self) -> bool:
        """Whether a term averages over the boxed samples, whose number varies by batch."""
        return self.factual is not None or self.cf_loss is not None or self.regularizer is not None

    def rows_per_term(self, batch: Batch) -> dict[str, torch.Tensor]:
        """How many rows each term of `batch` averages over, as 0-d tensors on the batch's device
        (no sync): CE the images and their factuals, CF and Sal the boxed samples. A --batch-split
        chunk's term weighs its rows over the whole batch's, so that the chunks add up to the
        batch's means even when the boxed samples fall unevenly between them."""
        boxed = batch.box_valid.any(dim=1).sum()
        if self.factual is None or self.replaces_originals:  # replace: one CE row per image still
            rows = {"ce": torch.full_like(boxed, len(batch))}
        else:
            rows = {"ce": self.factual_weight() * boxed + len(batch)}
        if self.cf_loss is not None:
            rows["cf"] = boxed
        if self.regularizer is not None:
            rows["sal"] = boxed
        return rows

    def _rows(self, model, batch, x, y, holes, region, has_box, mixed) -> dict[str, torch.Tensor]:
        """The images of the one forward pass by role: x (or its mix), the unmixed x when mixup
        meets an input-gradient penalty, the factuals and the counterfactuals of boxed samples."""
        rows = {"x": x if mixed is None else mixed[0]}
        if mixed is not None and x.requires_grad:
            rows["x_sal"] = x
        clean = x.detach()
        if self.factual is not None and bool(has_box.any()):
            kept = pasted_region(region, holes, clean, self.config)
            rows["f"] = self.factual(
                clean[has_box], kept[has_box], y[has_box], self.generator, model=model, config=self.config,
                rects=holes[has_box],
            )
        if self.cf_loss is not None:
            rows["cf"] = self._counterfactuals(clean, holes, has_box, batch)
        return rows

    def _weights_of(self, groups: list[str], device) -> torch.Tensor:
        return torch.tensor([self.group_weights.get(g, 1.0) for g in groups], device=device)

    def _cross_entropy(self, logits, y, has_box, mixed, batch_groups) -> torch.Tensor:
        """Mean CE over the rows of x (mixup's mixed CE under mixup) and of x_f, label-smoothed."""
        smoothing = self.config.label_smoothing
        if mixed is None:
            losses = [F.cross_entropy(logits["x"], y, label_smoothing=smoothing, reduction="none")]
            if self.group_weights is not None:
                losses[0] = losses[0] * self._weights_of(batch_groups, y.device)
        else:
            _, y_partner, lam = mixed
            losses = [mixup_cross_entropy(logits["x"], y, y_partner, lam, smoothing)]
        if "f" not in logits:
            return losses[0].mean()
        factual = F.cross_entropy(logits["f"], y[has_box], label_smoothing=smoothing, reduction="none")
        if self.replaces_originals:
            unboxed = losses[0][~has_box]
            return (unboxed.sum() + factual.sum()) / (len(unboxed) + len(factual))
        weight = self.factual_weight(logits["x"])
        return (losses[0].sum() + weight * factual.sum()) / (len(losses[0]) + weight * len(factual))

    @property
    def replaces_originals(self) -> bool:
        """--f-weight replace: a boxed image's CE is its factual's alone (its original still
        trains CF and Sal); an image without a box keeps its original."""
        return self.config.f_weight == "replace"

    def factual_weight(self, logits: torch.Tensor | None = None) -> float:
        """A factual row's weight in the CE beside its original: --f-weight, where auto (under
        other-class partners) is the number of classes - 1. Each factual then carries the
        background of one of the K - 1 other classes, and when every original's background is its
        own class's, each background comes with each class about equally often in the CE (the
        official equal weight does that for two classes only: on four, the recipe stayed near the
        place)."""
        weight = self.config.f_weight
        if weight == "auto":
            if logits is None:
                raise ValueError("--f-weight auto: construct Objective with num_classes to count rows before a step")
            weight = self.config.with_factual_pairing(class_logits(logits, self.config.cf_loss).shape[1]).f_weight
            if weight == "replace":  # the rows a step counts depend on it: decided before the step
                raise ValueError("--f-weight auto with --f-partner any: construct Objective with num_classes")
        return float(weight)

    def _saliency(self, model, x, y, logits_x) -> torch.Tensor:
        """g: the input gradient of the score of the class logits, or a captum attribution."""
        if self.score is not None:
            logits = class_logits(logits_x, self.config.cf_loss).float()
            return input_gradient(logits, x, y, self.score, scale=score_scale(x.device.type))
        return self.attribution(model, x.detach(), y)

    def _inputs(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's input: every row, in order, GridMask-ed under --gridmask."""
        inputs = rows["x"] if len(rows) == 1 else torch.cat(list(rows.values()))  # ERM: no copy
        return gridmask(inputs, self.generator) if self.config.gridmask else inputs

    def _forward(self, model, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The logits of every row by role, from one forward pass of all of them."""
        return dict(zip(rows, model(self._inputs(rows)).split([len(r) for r in rows.values()])))

    def _forward_with_finite_differences(self, model, rows, x, y, region, has_box):
        """--reg-impl finite-diff (trainer/hvp.py): the logits of every row and the penalty, whose
        value is P(g) of the first-order g and whose weight gradient is that of
        (s(x + h v) - s(x)) / h with v = dP/dg.

        Two passes of every row, as one batch (BatchNorm's batch statistics couple the rows as in
        the exact step's one pass): (1) on the bare model, s(x) of x's rows and, in one
        first-order backward, both g and the weight gradient of s(x), which enters the loss as a
        linear term; (2) through `model` with the ReLU pattern of (1), the rows that x reaches
        moved by h v (a step of eps |x|): s(x + h v), and every row's logits for the other terms.
        Running statistics are updated from pass (2) alone. (x's rows as a batch of their own,
        apart from the factual and counterfactual rows, would cost a third less, but BatchNorm
        then normalises each group by its own statistics: on the recipe's real batches of
        `four-class` the weight gradient's cosine with the exact one fell to 0.56-0.96, against
        1.000 this way, and the recipe's worst group to 0.547 +- 0.380 over three seeds.)"""
        config = self.config
        name = "x_sal" if "x_sal" in rows else "x"
        bare = unwrap(model)
        sizes = [len(r) for r in rows.values()]
        start = sum(sizes[: list(rows).index(name)])
        saliency_rows = slice(start, start + len(rows[name]))
        inputs = self._inputs(rows)
        # Pass (1) starts from a leaf, so its backward does not keep the model's graph alive; g
        # then follows the cheap map from x to the rows (concatenation, GridMask, mixup) back.
        leaf = inputs.detach().requires_grad_(True)
        params = [p for p in bare.parameters() if p.requires_grad]
        pattern = ActivationPattern()
        with running_statistics_frozen(bare), pattern:
            logits = bare(leaf)[saliency_rows]
            reference = self.score(class_logits(logits, config.cf_loss).float(), y)
        scale = score_scale(x.device.type)
        input_grads, *weight_grads = torch.autograd.grad(reference * scale, [leaf, *params], allow_unused=True)
        grads = input_grads if inputs is x else torch.autograd.grad(inputs, x, input_grads, retain_graph=True)[0]
        value, direction = value_and_direction(
            self.regularizer, grads / scale, region, has_box, inputs=x.detach(), counterfactuals=rows.get("cf")
        )
        step, inverse_step = step_size(x, direction, STEP_EPS[autocast_dtype(x.device.type)])
        moved = (inputs + push_forward(inputs, x, step * direction)).detach()
        with pattern.replay():
            logits = dict(zip(rows, model(moved).split(sizes)))
        perturbed = self.score(class_logits(logits[name], config.cf_loss).float(), y)
        # d s(x) / d theta, already computed, as a linear term: its gradient is the constant.
        reference_term = sum((p * g.to(p.dtype)).sum() for p, g in zip(params, weight_grads) if g is not None) / scale
        return logits, finite_difference_term(value, perturbed, reference_term, inverse_step)

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
