"""The baselines the paper compares with: mixup and GridMask, batched on the device (label
smoothing is the `label_smoothing` argument of the cross-entropy in trainer/objective.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# GridMask as the official code sets it up (zzzace2000/robust_cls_model, arch/grid.py, after the
# GridMask paper's ImageNet setting): period d drawn in [96, 224) for 224-px images, a stripe of
# ceil(0.6 d) kept per period, random rotation, applied to an image with probability 0.8.
GRID_PERIOD_MIN = 96 / 224
GRID_KEEP_RATIO = 0.6
GRID_PROB = 0.8


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float, generator=None):
    """(lam x + (1 - lam) x[perm], y[perm], lam), lam ~ Beta(alpha, alpha) once per batch, as the
    official mixup_data (arch/lightning/base.py)."""
    lam = float(_host_rng(generator).beta(alpha, alpha))
    perm = torch.randperm(len(labels), generator=generator, device=labels.device)
    return lam * images + (1 - lam) * images[perm], labels[perm], lam


def mixup_cross_entropy(logits, labels, partner_labels, lam: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample lam CE(y) + (1 - lam) CE(y[perm]) (the official mixup_criterion, unreduced)."""
    ce = lambda y: F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")  # noqa: E731
    return lam * ce(labels) + (1 - lam) * ce(partner_labels)


def grid_drop_mask(
    height: int, width: int, period: torch.Tensor, row_offset: torch.Tensor, col_offset: torch.Tensor,
    angle: torch.Tensor, keep_ratio: float = GRID_KEEP_RATIO,
) -> torch.Tensor:
    """Bool [B, 1, H, W], True on the dropped squares of each image's grid.

    Per period d, stripes of ceil(keep_ratio d) rows and columns are kept and the
    (d - ceil(keep_ratio d))^2 square between them is dropped (the official mode 1); the grid is
    shifted by the offsets and rotated by `angle` (radians) about the image centre, sampled at
    the nearest grid point like the official PIL rotation.
    """
    device = period.device
    rows = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    r, c = rows[None, :, None], cols[None, None, :]
    u = torch.floor(cos * r - sin * c + (height - 1) / 2 + 0.5).long()
    v = torch.floor(sin * r + cos * c + (width - 1) / 2 + 0.5).long()
    d = period[:, None, None]
    kept = torch.ceil(period * keep_ratio).long()[:, None, None]
    dropped = ((u - row_offset[:, None, None]) % d >= kept) & ((v - col_offset[:, None, None]) % d >= kept)
    return dropped[:, None]


def gridmask(images: torch.Tensor, generator=None, prob: float = GRID_PROB) -> torch.Tensor:
    """GridMask: each image, with probability `prob`, gets its grid's squares set to 0 (the
    dataset-mean colour), with its own period, offsets and rotation."""
    batch, _, height, width = images.shape
    device = images.device
    side = min(height, width)
    low = max(2, round(GRID_PERIOD_MIN * side))
    uniform = lambda: torch.rand(batch, generator=generator, device=device)  # noqa: E731
    period = low + (uniform() * max(1, side - low)).long()
    row_offset = (uniform() * period).long()
    col_offset = (uniform() * period).long()
    angle = uniform() * 2 * math.pi
    dropped = grid_drop_mask(height, width, period, row_offset, col_offset, angle)
    dropped &= (uniform() < prob)[:, None, None, None]
    return images.masked_fill(dropped, 0.0)


def _host_rng(generator) -> np.random.Generator:
    """A numpy generator seeded from the torch one (torch's Beta sampler takes no generator)."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (), generator=generator, device=device)
    return np.random.default_rng(int(seed))
