"""Synthetic noise images for out-of-distribution detection, made and scored under DDP.

The official code scores Gaussian and uniform noise images against each test split (its
`test_epoch_end`), but its public release does not include how it made them; we follow Liang
et al. (ODIN, 2018): Gaussian noise is i.i.d. N(0.5, 1) per pixel and channel clipped to [0, 1],
uniform noise is i.i.d. U[0, 1]. Both are quantised to 8 bits, like the shards' images, and
then normalised like every image the model sees.

Image i of a kind is the same for any number of processes or batch size: images are made in
fixed chunks, each from its own generator seeded by (seed, kind, chunk), so the first n images
of a longer run are the n images of a shorter one.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from cfrobust.distributed import DistEnv, gather_objects
from cfrobust.errors import UserError

NOISE_KINDS = ("gaussian", "uniform")
NOISE_CHUNK = 64  # images per generator (and per forward pass)


def check_noise_kinds(kinds: list[str]) -> list[str]:
    unknown = [k for k in kinds if k not in NOISE_KINDS]
    if unknown:
        raise UserError(f"--ood {unknown[0]!r}: unknown noise kind (choose from {', '.join(NOISE_KINDS)})")
    return list(dict.fromkeys(kinds))  # in the given order, once each


def noise_images(kind: str, seed: int, chunk: int, count: int, size: int) -> np.ndarray:
    """uint8 [count, 3, size, size]: chunk `chunk` of the `kind` noise images of `seed`."""
    rng = np.random.default_rng([seed, NOISE_KINDS.index(kind), chunk])
    shape = (count, 3, size, size)
    if kind == "gaussian":
        values = rng.standard_normal(shape, dtype=np.float32) + 0.5
    else:
        values = rng.random(shape, dtype=np.float32)
    return np.rint(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)


def noise_scores(
    score_images: Callable[[torch.Tensor], np.ndarray], kind: str, count: int, size: int, seed: int, env: DistEnv
) -> np.ndarray:
    """score_images(uint8 images) of the first `count` noise images of `kind`: each rank scores
    every world_size-th chunk; the result, in image order, is on every rank."""
    chunks = range(math.ceil(count / NOISE_CHUNK))
    mine = {}
    for chunk in chunks[env.rank :: env.world_size]:
        images = noise_images(kind, seed, chunk, min(NOISE_CHUNK, count - chunk * NOISE_CHUNK), size)
        mine[chunk] = score_images(torch.from_numpy(images))
    scored = {chunk: scores for part in gather_objects(mine, env) for chunk, scores in part.items()}
    return np.concatenate([scored[c] for c in chunks]) if count else np.zeros(0)
