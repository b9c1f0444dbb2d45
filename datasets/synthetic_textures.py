"""Backgrounds of the benchmark family: several natural-looking textures per place, from numpy noise.

Each texture is blurred noise, streaks or warped sinusoids mapped onto a two-colour palette of its place.
"""

from __future__ import annotations

import math

import numpy as np

TEXTURE_CONTRAST = 0.3


def background(rng: np.random.Generator, place: str, side: int) -> tuple[np.ndarray, str]:
    """A `side` x `side` RGB uint8 background of `place`, and the name of the texture drawn."""
    textures = TEXTURES[place]
    name = list(textures)[int(rng.integers(len(textures)))]
    image = textures[name](rng, side)
    # Textures at half their drawn contrast: the place stays obvious from colour and grain,
    # while the object's edges stay the strongest in the picture.
    mean = image.mean(axis=(0, 1))
    image = mean + TEXTURE_CONTRAST * (image - mean)
    # Per-image lighting and colour cast, then grain, so no two backgrounds share exact colours.
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15, 3)
    image = image + rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), name


def gaussian_blur(field: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    """Separable Gaussian blur over the first two axes (reflected edges), truncated at 2.5 sigma."""
    field = _blur_axis(field, sigma_y, 0)
    return _blur_axis(field, sigma_y if sigma_x is None else sigma_x, 1)


def _blur_axis(field: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    if sigma <= 0:
        return field
    radius = math.ceil(2.5 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    pad = [(0, 0)] * field.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(field.astype(np.float32), pad, mode="reflect")
    length = field.shape[axis]
    return sum(t * np.take(padded, np.arange(i, i + length), axis=axis) for i, t in enumerate(taps))


def smooth_noise(rng: np.random.Generator, side: int, scale_y: float, scale_x: float | None = None) -> np.ndarray:
    """Zero-mean, unit-variance noise whose features are about `scale` pixels (streaks when the
    two scales differ): coarse normal noise, enlarged and blurred."""
    scale_x = scale_y if scale_x is None else scale_x
    cell_y, cell_x = max(1, round(scale_y)), max(1, round(scale_x))
    coarse = rng.normal(size=(side // cell_y + 2, side // cell_x + 2))
    fine = gaussian_blur(np.kron(coarse, np.ones((cell_y, cell_x))), 0.6 * cell_y, 0.6 * cell_x)
    dy, dx = rng.integers(0, cell_y), rng.integers(0, cell_x)
    field = fine[dy : dy + side, dx : dx + side]
    return (field - field.mean()) / (field.std() + 1e-6)


def stripes(rng: np.random.Generator, side: int, period: float, angle: float, warp: float, warp_scale: float) -> np.ndarray:
    """Values in [0, 1] of a sinusoid along `angle`, its phase bent by smooth noise (ripples, waves, rows)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    phase = 2 * np.pi * along / period + rng.uniform(0, 2 * np.pi) + warp * smooth_noise(rng, side, warp_scale)
    return 0.5 + 0.5 * np.sin(phase)


def two_tone(t: np.ndarray, dark, light) -> np.ndarray:
    """Blend two RGB colours by `t` in [0, 1] (clipped) -> HxWx3 float."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(dark, np.float32) * (1 - t) + np.asarray(light, np.float32) * t


def _squash(field: np.ndarray, contrast: float = 0.3) -> np.ndarray:
    return 0.5 + contrast * field


# --- land ----------------------------------------------------------------------------------

def grass(rng, side):
    """Upright blades: noise stretched tall, over a greener or yellower ground."""
    blades = smooth_noise(rng, side, rng.uniform(5, 9), 1)
    return two_tone(_squash(blades, 0.35), (35, 75, 20), (115, 165, 55))


def forest(rng, side):
    """Canopy from above: dark crowns and lighter gaps at two scales."""
    crowns = 0.7 * smooth_noise(rng, side, rng.uniform(6, 10)) + 0.3 * smooth_noise(rng, side, 2.5)
    return two_tone(_squash(np.tanh(1.5 * crowns), 0.5), (20, 50, 20), (95, 105, 45))


def fields(rng, side):
    """Crop rows at a slant, slightly wavy, with patches of a second crop."""
    rows = stripes(rng, side, rng.uniform(5, 9), rng.uniform(0, np.pi), 1.0, 12)
    patches = smooth_noise(rng, side, 14)
    return two_tone(0.6 * rows + 0.2 * patches + 0.2, (65, 105, 35), (150, 150, 60))


# --- water ---------------------------------------------------------------------------------

def waves(rng, side):
    """Long horizontal swell with bent crests."""
    swell = stripes(rng, side, rng.uniform(5, 10), np.pi / 2 + rng.uniform(-0.3, 0.3), 2.0, 16)
    return two_tone(swell, (25, 65, 135), (95, 155, 205))


def choppy(rng, side):
    """Short crossing wavelets: three sinusoids in random directions."""
    chop = sum(stripes(rng, side, rng.uniform(3.5, 7), rng.uniform(0, np.pi), 0.5, 8) for _ in range(3)) / 3
    return two_tone(_squash(2.0 * (chop - 0.5), 0.5), (15, 45, 105), (70, 140, 175))


def reflections(rng, side):
    """Calm water: wide horizontal streaks with bright glints of sky."""
    streaks = smooth_noise(rng, side, 1.5, rng.uniform(10, 18))
    image = two_tone(_squash(streaks, 0.25), (35, 80, 140), (80, 130, 185))
    glints = (streaks > 1.6)[..., None]
    return np.where(glints, np.float32(225), image)


# --- desert --------------------------------------------------------------------------------

def ripples(rng, side):
    """Wind ripples in sand."""
    ripple = stripes(rng, side, rng.uniform(4, 7), rng.uniform(0, np.pi), 1.5, 10)
    return two_tone(0.7 * ripple + 0.15, (150, 115, 70), (215, 180, 120))


def dunes(rng, side):
    """Large smooth dunes with a lit and a shaded side."""
    return two_tone(_squash(smooth_noise(rng, side, rng.uniform(14, 22)), 0.35), (160, 120, 70), (230, 200, 140))


def pebbles(rng, side):
    """Gravel: small dark and light stones on sand."""
    grain = smooth_noise(rng, side, 2)
    return two_tone(_squash(np.tanh(2.0 * grain), 0.45), (115, 95, 75), (200, 170, 120))


# --- snow ----------------------------------------------------------------------------------

def drifts(rng, side):
    """Soft snow drifts with blue shadows."""
    return two_tone(_squash(smooth_noise(rng, side, rng.uniform(8, 14)), 0.35), (165, 180, 205), (240, 245, 250))


def ice(rng, side):
    """Pale ice crossed by thin dark cracks (where smooth noise passes through zero)."""
    cracks = np.exp(-((smooth_noise(rng, side, rng.uniform(8, 12)) / 0.12) ** 2))
    return two_tone(1 - cracks, (110, 140, 170), (205, 225, 240))


def snowfall(rng, side):
    """Grey sky full of flakes."""
    sky = two_tone(_squash(smooth_noise(rng, side, 16), 0.3), (135, 145, 160), (185, 195, 210))
    flakes = (rng.random((side, side)) < 0.08)[..., None]
    return np.where(flakes, np.float32(250), sky)


TEXTURES = {
    "land": {"grass": grass, "forest": forest, "fields": fields},
    "water": {"waves": waves, "choppy": choppy, "reflections": reflections},
    "desert": {"ripples": ripples, "dunes": dunes, "pebbles": pebbles},
    "snow": {"drifts": drifts, "ice": ice, "snowfall": snowfall},
}
