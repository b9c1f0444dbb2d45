"""DeepFill v1's two WGAN-GP critics and the training losses of the CAGAN inpainter.

As the official `inpaint_model.py` (v1): a global critic sees the whole completed image, a local
critic the fixed-size patch around the hole; each is four 5x5 stride-2 convolutions with leaky
ReLU (64-128-256-256 global, 64-128-256-512 local) and a linear score. Reconstruction is a
spatially discounted L1 inside the hole plus an L1 outside it, on both generator stages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GLOBAL_CHANNELS = (64, 128, 256, 256)
LOCAL_CHANNELS = (64, 128, 256, 512)


class Critic(nn.Module):
    """Convolutions 5x5 stride 2 ('SAME' padding) + leaky ReLU, then one linear score per image."""

    def __init__(self, channels: tuple[int, ...], height: int, width: int, in_channels: int = 3):
        super().__init__()
        layers, previous = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(previous, c, 5, stride=2, padding=2), nn.LeakyReLU(0.2)]
            previous = c
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        self.features = nn.Sequential(*layers)
        # The linear score as a vector, not nn.Linear(n, 1): the penalty's double backward gives
        # a [1, n] weight a gradient of other strides than DDP's bucket, and DDP warns each step.
        inputs = previous * height * width
        bound = 1 / math.sqrt(inputs)  # nn.Linear's initialisation
        self.score_weight = nn.Parameter(torch.empty(inputs).uniform_(-bound, bound))
        self.score_bias = nn.Parameter(torch.empty(()).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1) @ self.score_weight + self.score_bias


class Critics(nn.Module):
    """Local and global critic together: one module, one optimizer, one DDP wrapper."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.patch_size = (height // 2, width // 2)
        self.local = Critic(LOCAL_CHANNELS, *self.patch_size)
        self.whole = Critic(GLOBAL_CHANNELS, height, width)

    def forward(self, patches: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local(patches), self.whole(images)


def crop_patches(images: torch.Tensor, origins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-image crops [N, C, h, w] at origins [N, 2] = (x, y); differentiable w.r.t. images."""
    h, w = size
    rows = origins[:, 1, None] + torch.arange(h, device=images.device)  # [N, h]
    cols = origins[:, 0, None] + torch.arange(w, device=images.device)  # [N, w]
    index = torch.arange(len(images), device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def hole_masks(holes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer holes [N, 4] (x0, y0, x1, y1, exclusive ends) -> masks [N, 1, H, W], 1 in the hole."""
    ys = torch.arange(height, device=holes.device)[None, :, None]
    xs = torch.arange(width, device=holes.device)[None, None, :]
    x0, y0, x1, y1 = (holes[:, i, None, None] for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).float()[:, None]


def discount_weights(mask: torch.Tensor, gamma: float, max_distance: int | None = None) -> torch.Tensor:
    """Spatial discounting (Yu et al. 2018): a hole pixel weighs gamma ** d, d = its distance to the
    nearest known pixel of the image (chessboard steps, so 1 on the hole's rim; for a rectangle,
    the straight distance to its nearest side that borders known pixels). Known pixels weigh 0.

    Distances grow by one 3x3 dilation of the known region per step (pixels outside the image are
    not known), for at most max_distance steps (default: the image's larger side); a pixel still
    unreached is given max_distance + 1.
    """
    mask = mask.float()
    steps = max(mask.shape[-2:]) if max_distance is None else int(max_distance)
    reached = 1.0 - mask
    distance = torch.zeros_like(mask)
    for step in range(1, steps + 1):
        grown = F.max_pool2d(reached, 3, stride=1, padding=1)
        distance += (grown - reached) * step
        reached = grown
    distance += (1.0 - reached) * (steps + 1)
    return gamma**distance * mask


def hole_l1(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Discounted L1 inside the holes, per hole pixel and channel (weights from discount_weights)."""
    return ((output - target).abs() * weights).sum() / (mask.sum() * output.shape[1]).clamp(min=1.0)


def known_l1(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official `ae_loss`: L1 outside the holes, per known pixel and channel."""
    known = 1.0 - mask
    return ((output - target).abs() * known).sum() / (known.sum() * output.shape[1]).clamp(min=1.0)


def gradient_penalty(scores: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017) per sample: (||d score / d input||_2 - 1) ** 2, the norm taken
    over the mask's pixels only, as neuralgym's `gradients_penalty`. Keeps the graph, so the
    penalty trains the critic with the same backward pass."""
    grads = torch.autograd.grad(scores.sum(), inputs, create_graph=True)[0]
    squares = grads.float() ** 2
    if mask is not None:
        squares = squares * mask
    return (torch.sqrt(squares.flatten(1).sum(1) + 1e-12) - 1.0) ** 2


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the kept samples (weights 1) only."""
    return (values.float() * weights).sum() / weights.sum().clamp(min=1.0)
