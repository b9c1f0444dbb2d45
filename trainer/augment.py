"""Training augmentation on the device: a crop that keeps an object in view, a horizontal flip and
colour jitter, applied with the same parameters to an image, its counterfactuals, its object
region and its boxes.

Every parameter of a sample is a pure function of (seed, epoch, key): a resumed run, any number
of processes and any batch composition see each sample augmented the same way.
"""

# The crop follows the official box-aware RandomCrop (zzzace2000/robust_cls_model,
# arch/data/bbox_utils.py): the window is drawn so that at least part of a box stays inside it,
# boxes are clipped to the window, masks and counterfactuals are cut with the same window.
# Pixels are moved by index (nearest neighbour), so a plain crop or flip copies them exactly.

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch

# Aspect ratios of a random-resized crop (torchvision's RandomResizedCrop default).
RATIO_RANGE = (3 / 4, 4 / 3)
# Uniform draws per sample: box choice, top, left, flip, area, ratio, and four jitter factors.
DRAWS = 10


@dataclass(frozen=True)
class Augmentation:
    crop: int = 0  # output side in pixels (0: no crop)
    scale: tuple[float, float] | None = None  # random-resized crop: share of the image's area
    hflip: bool = False
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> "Augmentation":
        return cls(config.crop, parse_floats(config.crop_scale, "crop-scale", 2) if config.crop_scale else None,
                   config.hflip, parse_jitter(config.color_jitter) if config.color_jitter else None,
                   config.seed)

    @property
    def active(self) -> bool:
        return bool(self.crop or self.hflip or self.jitter)

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        if not self.active:
            return batch
        draws = sample_uniforms(self.seed, epoch, batch.keys).to(batch.images.device)
        if self.crop or self.hflip:
            batch = self._move_pixels(batch, draws)
        if self.jitter:
            factors = jitter_factors(draws[:, 6:10], self.jitter)
            batch = replace(batch, images=color_jitter(batch.images, factors),
                            cf={m: color_jitter(t, factors) for m, t in batch.cf.items()})
        return batch

    def _move_pixels(self, batch: Batch, draws: torch.Tensor) -> Batch:
        height, width = batch.images.shape[2:]
        size = self.crop or height
        out_width = self.crop or width
        window = crop_windows(batch.boxes, batch.box_valid, height, width, self.crop, self.scale, draws)
        flipped = draws[:, 3] < 0.5 if self.hflip else torch.zeros_like(draws[:, 3], dtype=torch.bool)
        rows, cols = sampling_grid(window, size, out_width, flipped)
        boxes, valid = moved_boxes(batch.boxes, batch.box_valid, window, size, out_width, flipped)
        return replace(
            batch,
            images=gather_pixels(batch.images, rows, cols),
            cf={m: gather_pixels(t, rows, cols) for m, t in batch.cf.items()},
            masks=None if batch.masks is None else gather_pixels(batch.masks, rows, cols),
            boxes=boxes,
            box_valid=valid,
        )


def parse_floats(text: str, option: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"--{option} {text!r}: expected {count} comma-separated non-negative numbers")
    return values


def parse_jitter(text: str) -> tuple[float, ...]:
    values = parse_floats(text, "color-jitter", 4)
    if values[3] > 0.5:  # a hue shift of half the colour circle each way already reaches every hue
        raise UserError(f"--color-jitter {text!r}: the hue range (4th number) must lie in [0, 0.5]")
    return values


def sample_uniforms(seed: int, epoch: int, keys: list[str]) -> torch.Tensor:
    """[B, DRAWS] floats in [0, 1), each row a function of (seed, epoch, key) alone."""
    digests = b"".join(hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode(), digest_size=4 * DRAWS).digest()
                       for key in keys)
    words = np.frombuffer(digests, dtype="<u4").reshape(len(keys), DRAWS)
    return torch.from_numpy(words / 2.0**32)


def crop_windows(boxes, valid, height: int, width: int, crop: int, scale, draws) -> torch.Tensor:
    """[B, 4] int64 (top, left, window height, window width). The window of a sample with boxes
    overlaps one of them (drawn at random) by at least one pixel; without boxes it lies anywhere."""
    batch = len(boxes)
    if not crop:
        window = torch.tensor([0, 0, height, width], device=boxes.device)
        return window.expand(batch, 4)
    if scale is None:
        win_h = torch.full((batch,), crop, device=boxes.device)
        win_w = win_h
    else:
        win_h, win_w = resized_crop_sides(height, width, scale, draws[:, 4], draws[:, 5])
    chosen = chosen_box(boxes, valid, draws[:, 0])
    has_box = valid.any(dim=1)
    top = origin(chosen[:, 1], chosen[:, 3], height, win_h, has_box, draws[:, 1])
    left = origin(chosen[:, 0], chosen[:, 2], width, win_w, has_box, draws[:, 2])
    return torch.stack([top, left, win_h, win_w], dim=1)


def resized_crop_sides(height: int, width: int, scale, area_draw, ratio_draw) -> tuple[torch.Tensor, torch.Tensor]:
    area = height * width * (scale[0] + area_draw * (scale[1] - scale[0]))
    log_low, log_high = math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1])
    ratio = torch.exp(log_low + ratio_draw * (log_high - log_low))
    win_w = torch.sqrt(area * ratio).round().clamp(1, width).long()
    win_h = torch.sqrt(area / ratio).round().clamp(1, height).long()
    return win_h, win_w


def chosen_box(boxes, valid, draw) -> torch.Tensor:
    """[B, 4] one valid box per sample, uniformly among its valid ones (row 0 when it has none)."""
    counts = valid.sum(dim=1)
    pick = (draw * counts).floor().long().clamp(max=(counts - 1).clamp(min=0))
    rank = valid.long().cumsum(dim=1) - 1  # position of each valid box among the valid ones
    index = ((rank == pick[:, None]) & valid).long().argmax(dim=1)
    return boxes[torch.arange(len(boxes), device=boxes.device), index]


def origin(low_edge, high_edge, side: int, window, has_box, draw) -> torch.Tensor:
    """The window's first row (or column): uniform over the positions where it overlaps the pixels
    [floor(low_edge), ceil(high_edge)) of the chosen box, or over all positions without a box."""
    first = low_edge.floor().clamp(0, side - 1).long()
    last = (high_edge.ceil().clamp(1, side) - 1).long()
    start = torch.where(has_box, (first - window + 1).clamp(min=0), torch.zeros_like(first))
    stop = torch.where(has_box, torch.minimum(last, side - window), side - window)
    return start + (draw * (stop - start + 1)).floor().long().clamp(max=stop - start)


def sampling_grid(window, out_height: int, out_width: int, flipped) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows [B, out_height] and columns [B, out_width] of each output pixel: the window's
    pixels resized by nearest neighbour, columns reversed where flipped."""
    top, left, win_h, win_w = window.unbind(dim=1)
    out_rows = torch.arange(out_height, device=window.device)
    out_cols = torch.arange(out_width, device=window.device)
    out_cols = torch.where(flipped[:, None], out_width - 1 - out_cols, out_cols)
    rows = top[:, None] + ((2 * out_rows + 1) * win_h[:, None]) // (2 * out_height)
    cols = left[:, None] + ((2 * out_cols + 1) * win_w[:, None]) // (2 * out_width)
    return rows, cols


def gather_pixels(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, h, w] with pixel (i, j) of sample b taken from (rows[b, i], cols[b, j]).

    Whole pixels are picked by their number in the channels-last order the loader decodes into,
    with one index_select: a third of the time of indexing with three broadcast index tensors."""
    hwc = images.permute(0, 2, 3, 1)
    batch, height, width, channels = hwc.shape
    first_row = torch.arange(batch, device=images.device)[:, None, None] * height
    pixel = ((first_row + rows[:, :, None]) * width + cols[:, None, :]).reshape(-1)
    picked = hwc.reshape(batch * height * width, channels).index_select(0, pixel)
    return picked.view(batch, rows.shape[1], cols.shape[1], channels).permute(0, 3, 1, 2)


def moved_boxes(boxes, valid, window, out_height: int, out_width: int, flipped) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes in the output's pixels: shifted to the window, scaled to the output, mirrored where
    flipped and clipped to the image; a box left with no area is no longer valid."""
    top, left, win_h, win_w = (w.to(boxes.dtype)[:, None] for w in window.unbind(dim=1))
    x0 = ((boxes[..., 0] - left) * out_width / win_w).clamp(0, out_width)
    x1 = ((boxes[..., 2] - left) * out_width / win_w).clamp(0, out_width)
    y0 = ((boxes[..., 1] - top) * out_height / win_h).clamp(0, out_height)
    y1 = ((boxes[..., 3] - top) * out_height / win_h).clamp(0, out_height)
    mirror = flipped[:, None]
    x0, x1 = torch.where(mirror, out_width - x1, x0), torch.where(mirror, out_width - x0, x1)
    still_valid = valid & (x1 > x0) & (y1 > y0)
    moved = torch.stack([x0, y0, x1, y1], dim=-1) * still_valid[..., None]
    return moved, still_valid


def jitter_factors(draws: torch.Tensor, jitter) -> torch.Tensor:
    """[B, 4] per-sample brightness, contrast and saturation factors in [max(0, 1 - j), 1 + j] and
    a hue shift in [-j, j] (a fraction of the colour circle), as torchvision's ColorJitter draws."""
    brightness, contrast, saturation, hue = jitter
    low = draws.new_tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
    high = draws.new_tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
    return low + draws * (high - low)


# RGB -> grey (ITU-R 601 luma, torchvision's rgb_to_grayscale) and RGB <-> YIQ for the hue rotation.
LUMA = (0.299, 0.587, 0.114)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def color_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] with brightness, contrast, saturation, then hue changed per sample
    (a fixed order; each step clipped to the pixel range, as torchvision's)."""
    x = images.float()
    view = factors.to(x.dtype)[:, :, None, None, None]  # [B, 4, 1, 1, 1]
    x = (x * view[:, 0]).clamp(0, 255)
    mean_grey = grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean_grey) * view[:, 1] + mean_grey).clamp(0, 255)
    x = ((x - grey(x)) * view[:, 2] + grey(x)).clamp(0, 255)
    x = rotate_hue(x, factors[:, 3]).clamp(0, 255)
    return x.round().to(torch.uint8)


def grey(x: torch.Tensor) -> torch.Tensor:
    luma = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


def rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's chroma by shift x 360 degrees in YIQ space (brightness kept)."""
    to_yiq = x.new_tensor(RGB_TO_YIQ)
    angle = shift.to(x.dtype) * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)
    transform = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", transform, x)
