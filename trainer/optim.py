"""Optimizers and learning-rate schedules by name, with one place that says when each steps."""

from __future__ import annotations

import math

import torch

from cfrobust.errors import UserError

# A validation loss counts as better only when it is below the best so far by more than this
# fraction of the best (torch's relative mode): the official Waterbirds schedule's threshold.
PLATEAU_THRESHOLD = 1e-4


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise UserError(f"unknown --optimizer {config.optimizer!r}")


class Schedule:
    """The learning-rate schedule: `after_step()` after every optimizer step, `after_epoch(val_loss)`
    after every epoch; only the one that matches the schedule's kind moves the rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, config, steps_per_epoch: int):
        self.kind = config.scheduler
        total = max(1, steps_per_epoch * config.epochs)
        if self.kind == "cosine":
            self.torch = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
        elif self.kind == "step":
            self.torch = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(config.milestones), config.gamma)
        elif self.kind == "plateau":
            self.torch = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=config.gamma, patience=config.plateau_patience,
                threshold=PLATEAU_THRESHOLD, threshold_mode="rel",
            )
        else:
            self.torch = None

    def after_step(self) -> None:
        if self.kind == "cosine":
            self.torch.step()

    def after_epoch(self, val_loss: float | None) -> None:
        if self.kind == "step":
            self.torch.step()
        elif self.kind == "plateau" and val_loss is not None:
            self.torch.step(val_loss)

    def state_dict(self) -> dict:
        return self.torch.state_dict() if self.torch is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.torch is not None:
            self.torch.load_state_dict(state)


def milestones(text: str) -> list[int]:
    try:
        return sorted(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--milestones {text!r}: expected comma-separated epochs such as 6,12,18") from None
