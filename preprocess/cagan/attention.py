"""Contextual attention (DeepFill v1): fill the hole's features with soft copies of background
patches, plus the two TensorFlow-compatible ops (SAME padding, nearest resize) the generator shares.

The released checkpoints were trained with TF1 ops whose conventions differ from torch's defaults;
the functions here reproduce those conventions exactly so the weights mean the same thing.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF 'SAME': the output has ceil(size / stride) positions and
    any odd leftover goes after (bottom/right), which matters for the stride-2 convolutions."""
    span = dilation * (kernel - 1) + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """`x` (N×C×H×W) zero-padded as TF 'SAME' would before a convolution or patch extraction."""
    top, bottom = same_padding(x.shape[-2], kernel, stride, dilation)
    left, right = same_padding(x.shape[-1], kernel, stride, dilation)
    return F.pad(x, (left, right, top, bottom))


@functools.lru_cache(maxsize=128)
def _source_index(in_size: int, out_size: int) -> np.ndarray:
    # TF1 resize_nearest_neighbor(align_corners=True): out pixel i reads round(i * scale) with
    # scale = (in - 1) / (out - 1), both in float32 and rounded half away from zero (roundf).
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    position = np.arange(out_size, dtype=np.float32) * scale
    return np.minimum(np.floor(position.astype(np.float64) + 0.5), in_size - 1).astype(np.int64)


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 `resize_nearest_neighbor(x, size, align_corners=True)` (neuralgym's `resize` default),
    used by the official code for every up- and downsampling. For a 2x upsample it agrees with
    torch's 'nearest', but not when downsampling: 16 -> 8 reads 0,2,4,6,9,11,13,15 (torch:
    0,2,...,14), which moves the attention's mask and matching grid."""
    rows = torch.from_numpy(_source_index(x.shape[-2], size[0])).to(x.device)
    cols = torch.from_numpy(_source_index(x.shape[-1], size[1])).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def fuse_scores(scores: torch.Tensor, grid: tuple[int, int], fuse_k: int = 3) -> torch.Tensor:
    """The official "fuse" step: to favour copying whole regions, the score of (position p,
    patch q) gains those of (p±1, q±1) for neighbouring positions and correspondingly
    neighbouring patches, first in row-major then in column-major order. Like the official
    code it works on flattened indices, so a neighbour at a row's end is the next row's start.

    scores: 1×L×h×w (L = h*w background patches, one per position of the same `grid`).
    """
    height, width = grid
    count = height * width
    diagonal = torch.eye(fuse_k, dtype=scores.dtype, device=scores.device).view(1, 1, fuse_k, fuse_k)

    def along_diagonal(matrix):  # matrix: positions × patches
        return F.conv2d(matrix[None, None], diagonal, padding=fuse_k // 2)[0, 0]

    by_rows = along_diagonal(scores[0].reshape(count, count).t())
    by_cols = by_rows.view(height, width, height, width).permute(1, 0, 3, 2).reshape(count, count)
    by_cols = along_diagonal(by_cols)
    fused = by_cols.view(width, height, width, height).permute(1, 0, 3, 2).reshape(count, count)
    return fused.t().reshape(1, count, height, width)


def contextual_attention(
    features: torch.Tensor,
    mask: torch.Tensor,
    rate: int = 2,
    ksize: int = 3,
    fuse_k: int = 3,
    softmax_scale: float = 10.0,
) -> torch.Tensor:
    """Every position of `features` (N×C×H×W) becomes a softmax-weighted paste of background
    patches of the same features, as the generator calls it (foreground = background).

    mask: N×1×H×W, 1 = hole. Matching runs at 1/rate resolution on ksize×ksize patches; a patch
    is a candidate only if it holds no hole pixel. Each image uses its own mask (the official
    code used the first image's mask for the whole batch). H and W must be multiples of `rate`,
    and `rate` even (TF's padding of the 2*rate paste patches is then symmetric).
    """
    n, channels, height, width = features.shape
    grid = (height // rate, width // rate)
    # What gets pasted: full-resolution 2*rate patches, one per position of the coarse grid.
    paste_k = 2 * rate
    raw = F.unfold(pad_same(features, paste_k, rate), paste_k, stride=rate)
    raw = raw.view(n, channels, paste_k, paste_k, -1).permute(0, 4, 1, 2, 3)  # N×L×C×k×k
    # What gets matched: ksize patches at 1/rate, L2-normalised, so a score is the cosine
    # similarity times the foreground's norm.
    small = resize_nearest(features, grid)
    patches = F.unfold(small, ksize, padding=ksize // 2).view(n, channels, ksize, ksize, -1)
    patches = patches.permute(0, 4, 1, 2, 3)
    patches = patches / patches.flatten(2).norm(dim=2).clamp_min(1e-4)[..., None, None, None]
    # Zero padding counts as background, as in TF's extract_image_patches.
    small_mask = resize_nearest(mask.to(features.dtype), grid)
    usable = (F.unfold(small_mask, ksize, padding=ksize // 2).mean(1) == 0).to(features.dtype)

    out = []
    for i in range(n):  # each image's patches are its own convolution weights
        scores = fuse_scores(F.conv2d(small[i : i + 1], patches[i], padding=ksize // 2), grid, fuse_k)
        allowed = usable[i].view(1, -1, 1, 1)
        # Masked before the softmax (a hole patch scores 0) and after (it pastes nothing).
        weights = F.softmax(scores * allowed * softmax_scale, dim=1) * allowed
        # A transposed conv pastes each weighted patch; every pixel is covered by (2*rate /
        # rate)^2 = 4 patches, hence the official division by 4.
        out.append(F.conv_transpose2d(weights, raw[i], stride=rate, padding=rate // 2) / 4.0)
    return torch.cat(out)
