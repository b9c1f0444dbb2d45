"""Reading source images and masks for preprocessing, as fast as the stored size allows.

JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, through OpenCV) whenever
the reduced image is still at least the stored size: decoding is most of preprocessing's cost,
and a stored 64-px image never needs the full 500-px decode. Box geometry always uses the
source's true size, read from the JPEG header.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cfrobust.shards.schema import decode_gray, decode_rgb

_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# JPEG start-of-frame markers carry the image size (C4, C8 and CC are other segments).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class RecordError(Exception):
    """A record that cannot be stored; the message says why."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment; None if `data` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + length
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; None if `data` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width and height else None


def source_size(source) -> tuple[int, int]:
    """(width, height) of a source image, from its header when it is a JPEG or PNG (no decode)."""
    if isinstance(source, np.ndarray):
        return source.shape[1], source.shape[0]
    data = source if isinstance(source, bytes) else read_file(Path(source), "image")
    size = jpeg_size(data) or png_size(data)
    if size is None:
        size = load_rgb(data, min_side=1)[1]
    return size


def load_rgb(source, min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as RGB (possibly reduced, never below `min_side` on either side) and the
    (width, height) of the source it came from."""
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise RecordError(f"image array must be HxWx3 uint8, got {source.shape} {source.dtype}")
        return source, (source.shape[1], source.shape[0])
    data = source if isinstance(source, bytes) else read_file(Path(source), "image")
    size = jpeg_size(data)
    factor = max((f for f in _REDUCED if size and min(size) // f >= min_side), default=1)
    try:
        if factor == 1:
            image = decode_rgb(data)
            return image, (image.shape[1], image.shape[0])
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise ValueError
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size
    except (ValueError, cv2.error):
        raise RecordError("unreadable image") from None


def load_mask(source, width: int, height: int) -> np.ndarray:
    """HxW uint8 mask, nonzero = object, checked to match the image's size."""
    if isinstance(source, np.ndarray):
        mask = source
    else:
        try:
            mask = decode_gray(read_file(Path(source), "mask"))
        except ValueError:
            raise RecordError(f"unreadable mask {source}") from None
    if mask.shape[:2] != (height, width):
        raise RecordError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    return mask if mask.dtype == np.uint8 else (mask != 0).astype(np.uint8)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The bounding box of the mask's nonzero pixels (far edges exclusive); None if empty."""
    x, y, w, h = cv2.boundingRect((mask != 0).view(np.uint8) if mask.dtype != np.uint8 else mask)
    return (float(x), float(y), float(x + w), float(y + h)) if w and h else None


def binarize(mask: np.ndarray) -> np.ndarray:
    """0/255 uint8 from any nonzero-is-object mask (grey-level segmentations included)."""
    return np.where(mask != 0, np.uint8(255), np.uint8(0))


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"missing {what} file {path}") from None
    except OSError as exc:
        raise RecordError(f"cannot read {what} file {path}: {exc.strerror}") from None


def resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = image.shape[0] > size or image.shape[1] > size
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return cv2.resize(image, (size, size), interpolation=interpolation)
