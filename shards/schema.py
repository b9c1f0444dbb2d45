"""What one sample of a shard holds and how its parts are encoded (DESIGN §4).

A sample is KEY.jpg, KEY.cf_<method>.jpg per precomputed counterfactual, optional KEY.mask.png
and KEY.json. Boxes are (x0, y0, x1, y1) in stored pixels; `box_pixel_bounds` is the one rule
that turns them into pixel ranges, shared by the offline fills and the trainer's masks.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np

SCHEMA = "cfrobust.shards/1"
INFO_NAME = "_info.json"
JPEG_QUALITY = 95
IMAGE_EXT = "jpg"
MASK_EXT = "mask.png"
META_EXT = "json"

# Pixel normalisation of the whole project (ImageNet's, which pretrained weights expect): the
# trainer maps uint8 images to (x / 255 - MEAN) / STD. The `mean` fill is the uint8 colour
# nearest MEAN, so it lands within half a grey level of 0 in the model's input space.
NORMALIZE_MEAN = (0.485, 0.456, 0.406)
NORMALIZE_STD = (0.229, 0.224, 0.225)
# The trainer's choices (`train --normalize`): (mean, std) per channel. `bit` is the official
# code's and BiT's, mean = std = 0.5 (inputs in [-1, 1]).
NORMALIZATIONS = {"imagenet": (NORMALIZE_MEAN, NORMALIZE_STD), "bit": ((0.5,) * 3, (0.5,) * 3)}
MEAN_RGB_UINT8 = tuple(round(255 * m) for m in NORMALIZE_MEAN)
# The `random` fill, offline and online: the official inpainter (robust_cls_model,
# arch/inpainting/Baseline.py, RandomColorWithNoiseInpainter) draws a colour per image and
# channel uniformly in [0, 1] and adds N(0, 0.2) noise per pixel and channel, clamped to
# [0, 1]: in uint8 units, 0.2 * 255.
RANDOM_NOISE_STD = 0.2 * 255


def shard_name(split: str, index: int, rank: int = 0, world_size: int = 1) -> str:
    """`train-000003.tar`; with several preprocessing processes, `train-r002-000003.tar`."""
    if world_size > 1:
        return f"{split}-r{rank:03d}-{index:06d}.tar"
    return f"{split}-{index:06d}.tar"


def part_info_name(rank: int, world_size: int) -> str:
    """The manifest one of several preprocessing processes writes for its slice of a split;
    `cfrobust shards merge` (or the last process to finish) combines them into `_info.json`."""
    return f"_info.r{rank:03d}-of-{world_size:03d}.json"


def cf_ext(method: str) -> str:
    """Extension of a precomputed counterfactual inside a sample, e.g. `cf_tile.jpg`."""
    return f"cf_{method}.jpg"


def box_pixel_bounds(box, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel columns [c0, c1) and rows [r0, r1) touched by a box, clipped to the image.

    Every pixel the box overlaps counts as object, so a removed object leaves no rim.
    """
    x0, y0, x1, y1 = box
    c0 = min(max(math.floor(x0), 0), width)
    r0 = min(max(math.floor(y0), 0), height)
    c1 = min(max(math.ceil(x1), 0), width)
    r1 = min(max(math.ceil(y1), 0), height)
    return c0, r0, c1, r1


def boxes_to_mask(boxes, width: int, height: int) -> np.ndarray:
    """HxW bool mask, True inside any box (the rectangular hole of DESIGN §5)."""
    mask = np.zeros((height, width), bool)
    for box in boxes:
        c0, r0, c1, r1 = box_pixel_bounds(box, width, height)
        mask[r0:r1, c0:c1] = True
    return mask


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(gray: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", gray)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB; raises ValueError when unreadable."""
    if not data:  # cv2 raises its own error type on an empty buffer
        raise ValueError("empty image data")
    # Pixels as stored: EXIF rotation would put annotations made on the stored pixels off target.
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise ValueError("unreadable image data")
    return pixels if _DECODES_RGB else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


# OpenCV >= 4.10 decodes straight to RGB, saving a colour-conversion pass per image.
_DECODES_RGB = hasattr(cv2, "IMREAD_COLOR_RGB")
_DECODE_FLAGS = cv2.IMREAD_COLOR_RGB if _DECODES_RGB else cv2.IMREAD_COLOR


def decode_gray(data: bytes) -> np.ndarray:
    if not data:
        raise ValueError("empty mask data")
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if gray is None:
        raise ValueError("unreadable mask data")
    return gray


def encode_meta(label: int, boxes, group: str, split: str, source: str, attrs: dict) -> bytes:
    meta = {
        "label": int(label),
        "boxes": [[round(float(v), 3) for v in box] for box in boxes],
        "group": group,
        "split": split,
        "source": source,
        "attrs": attrs,
    }
    return json.dumps(meta, sort_keys=True).encode()


def required_exts(cf_methods) -> list[str]:
    return [IMAGE_EXT, META_EXT] + [cf_ext(m) for m in cf_methods]
