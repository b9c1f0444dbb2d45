"""Temporary module modes for the extra forward passes of a step (attacks, attributions).

They run on the bare model (not its DDP wrapper) and leave every module's mode as it was.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel/DataParallel wrapper: an extra forward through
    the wrapper would arm its gradient reducer for a backward that never comes."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


@contextmanager
def evaluation_mode(model: nn.Module, kinds: tuple[type, ...] = (nn.Module,)):
    """Put the modules of the given kinds in eval mode; restore each one's own flag afterwards
    (model.train() would also wake modules the caller froze on purpose)."""
    switched = [m for m in model.modules() if isinstance(m, kinds) and m.training]
    for module in switched:
        module.training = False
    try:
        yield model
    finally:
        for module in switched:
            module.training = True


@contextmanager
def running_statistics_frozen(model: nn.Module):
    """BatchNorm layers in training mode normalise with the batch's statistics, as in the step's
    own forward pass, but leave their running statistics as they are (an extra pass of the same
    images would otherwise count them twice)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield model
    finally:
        for norm in norms:
            norm.track_running_stats = True
