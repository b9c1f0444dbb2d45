"""Counterfactual fills computed on the device, for `--cf-online`: whole batches at once.

Each fill has the meaning of its offline twin in `cfrobust.preprocess.fills` (telea/ns exist
offline only): it takes normalised images [B, 3, H, W], holes [B, 1, H, W] (bool) and a
torch.Generator, and returns new images that differ from the input only inside the holes.
"""

from __future__ import annotations

from typing import Callable

import torch

from cfrobust.shards.schema import NORMALIZE_MEAN, RANDOM_NOISE_STD
from cfrobust.trainer.pixels import mean_std, normalize, tiled_backgrounds

OnlineFill = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]


def online_mean(x: torch.Tensor, holes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ImageNet mean colour in the hole, as the offline fill (which rounds it to the nearest
    uint8 colour): 0 under the default normalisation, grey-ish under `bit`."""
    colour = to_normalized(torch.tensor(NORMALIZE_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1))
    return torch.where(holes, colour, x)


def online_tile(x: torch.Tensor, holes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's largest hole-free band, tiled and pasted into its hole."""
    return torch.where(holes, tiled_backgrounds(x, holes), x)


def online_random(x: torch.Tensor, holes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform colour per image plus per-pixel Gaussian noise, drawn in uint8 units and
    rounded like the offline fill, then normalised."""
    batch, channels, height, width = x.shape
    colour = torch.rand((batch, channels, 1, 1), generator=generator, device=x.device) * 255
    noise = torch.randn((batch, channels, height, width), generator=generator, device=x.device) * RANDOM_NOISE_STD
    pixels = (colour + noise).clamp(0, 255).round()
    return torch.where(holes, normalize(pixels).to(x.dtype), x)


def online_shuffle(x: torch.Tensor, holes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's values (all pixels and channels) randomly permuted, pasted into its hole.

    The permutation moves values between channels, so it happens in [0, 1] pixel units: a red
    value landing in the green channel is normalised as green, as the offline fill's would be.
    """
    pixels = pixel_units(x).flatten(1)
    keys = torch.rand(pixels.shape, generator=generator, device=x.device)
    shuffled = pixels.gather(1, keys.argsort(dim=1)).view_as(x)
    return torch.where(holes, to_normalized(shuffled), x)


def pixel_units(x: torch.Tensor) -> torch.Tensor:
    """Normalised images back to [0, 1] pixel values."""
    mean, std = mean_std(x.device, x.dtype)
    return x * std + mean


def to_normalized(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] float pixel values to normalised ones (`normalize` without the / 255)."""
    mean, std = mean_std(pixels.device, pixels.dtype)
    return (pixels - mean) / std


ONLINE_FILLS: dict[str, OnlineFill] = {
    "mean": online_mean,
    "random": online_random,
    "shuffle": online_shuffle,
    "tile": online_tile,
}
