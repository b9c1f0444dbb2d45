"""Factual augmentation: keep the object, replace its background; the label stays y."""

from __future__ import annotations

import torch

from cfrobust.trainer.pixels import tiled_backgrounds


def other_class_partner(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each sample, a random other sample of a different class (same class only if none)."""
    n = len(labels)
    noise = torch.rand(n, n, generator=generator, device=labels.device)
    differs = (labels[:, None] != labels[None, :]).float()
    itself = torch.eye(n, device=labels.device)
    return (noise + 2 * differs - 4 * itself).argmax(dim=1)


def mrand(images: torch.Tensor, holes: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
    """The object on the background of an image of another class, tiled from that image's
    largest object-free band so the other object's shape does not come along (official `mrand`)."""
    partner = other_class_partner(labels, generator)
    backgrounds = tiled_backgrounds(images, holes)[partner]
    return torch.where(holes, images, backgrounds)


FACTUAL_MODES = {"mrand": mrand}
