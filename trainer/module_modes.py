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
