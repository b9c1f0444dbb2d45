"""Classifiers by name: a small CNN for CPU-sized runs and torchvision ResNets."""

from __future__ import annotations

import torch
from torch import nn

from cfrobust.errors import UserError


def simple_cnn(num_classes: int) -> nn.Module:
    """Four conv blocks and global pooling: trains in minutes on 2 CPU cores at 64 px.

    Strided convolutions instead of max-pooling: the saliency penalty differentiates the
    network twice, and max-pool's double backward is several times slower on CPU.
    """

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16, 2),
        *block(16, 32, 2),
        *block(32, 64, 2),
        *block(64, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch == "simple-cnn":
        return simple_cnn(num_classes)
    if arch in ("resnet18", "resnet50"):
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    raise UserError(f"unknown --arch {arch!r}")
