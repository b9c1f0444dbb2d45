"""BiT ResNet-V2 (Kolesnikov et al., "Big Transfer"): pre-activation bottlenecks, GroupNorm, StdConv.

Module names follow the official ones, so `npz_key_table` maps each parameter to its official `.npz` key.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfrobust.errors import UserError

R50_UNITS = (3, 4, 6, 3)
HEAD_PREFIX = "head.conv."


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (zero mean, unit variance) at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        # eps 1e-10 as the official BiT code: the pretrained weights were trained with it.
        weight = (self.weight - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def std_conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> StdConv2d:
    return StdConv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class PreActBottleneck(nn.Module):
    """One unit: (GroupNorm, ReLU, conv) x 3 on the residual branch; a, b, c as in the official names.

    The stride sits on the 3x3 conv (as BiT, unlike the original ResNet-V2), and the projection
    shortcut reads the pre-activated input, as in "Identity Mappings in Deep Residual Networks".
    """

    def __init__(self, c_in: int, c_out: int, c_mid: int, stride: int = 1):
        super().__init__()
        self.norm_a, self.conv_a = nn.GroupNorm(32, c_in), std_conv(c_in, c_mid, 1)
        self.norm_b, self.conv_b = nn.GroupNorm(32, c_mid), std_conv(c_mid, c_mid, 3, stride)
        self.norm_c, self.conv_c = nn.GroupNorm(32, c_mid), std_conv(c_mid, c_out, 1)
        needs_proj = stride != 1 or c_in != c_out
        self.proj = std_conv(c_in, c_out, 1, stride) if needs_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: the saliency penalty differentiates through this graph twice.
        pre = F.relu(self.norm_a(x))
        shortcut = x if self.proj is None else self.proj(pre)
        out = self.conv_a(pre)
        out = self.conv_b(F.relu(self.norm_b(out)))
        out = self.conv_c(F.relu(self.norm_c(out)))
        return out + shortcut


def make_stage(c_in: int, c_mid: int, units: int, stride: int) -> nn.Sequential:
    """`units` bottlenecks named unit01, unit02, ...; the first one changes width and stride."""
    c_out = 4 * c_mid
    named = OrderedDict(unit01=PreActBottleneck(c_in, c_out, c_mid, stride))
    for i in range(2, units + 1):
        named[f"unit{i:02d}"] = PreActBottleneck(c_out, c_out, c_mid)
    return nn.Sequential(named)


class ResNetV2(nn.Module):
    """BiT ResNet-V2; R50x1 is `ResNetV2(num_classes)` with the defaults."""

    def __init__(self, num_classes: int, units: tuple[int, ...] = R50_UNITS, width: int = 1):
        super().__init__()
        root_width = 64 * width
        self.root = nn.Sequential(OrderedDict({
            "conv": StdConv2d(3, root_width, 7, stride=2, padding=3, bias=False),
            # Zero padding then an unpadded pool, as the official model: max-pool's own padding
            # would pad with -inf and give different borders for negative activations.
            "pad": nn.ConstantPad2d(1, 0.0),
            "pool": nn.MaxPool2d(3, stride=2),
        }))
        stages, c_in = {}, root_width
        for index, count in enumerate(units):
            c_mid = root_width * 2**index
            stages[f"block{index + 1}"] = make_stage(c_in, c_mid, count, stride=1 if index == 0 else 2)
            c_in = 4 * c_mid
        self.body = nn.Sequential(OrderedDict(stages))
        # Pre-activation nets end un-normalised: the head normalises before pooling.
        self.head = nn.Sequential(OrderedDict({
            "norm": nn.GroupNorm(32, c_in),
            "relu": nn.ReLU(),
            "pool": nn.AdaptiveAvgPool2d(1),
            "conv": nn.Conv2d(c_in, num_classes, 1),
        }))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.root(x))).flatten(1)

    def grad_cam_layer(self) -> nn.Module:
        """Grad-CAM's layer: the last spatial map (the head's 1x1 conv comes after pooling)."""
        return self.head.relu


def bit_s_r50x1(num_classes: int) -> ResNetV2:
    return ResNetV2(num_classes, R50_UNITS, width=1)


def unit_key_table(name: str, npz_prefix: str, unit: PreActBottleneck) -> dict[str, str]:
    """One unit: TF names a/b/c each hold the GroupNorm before the conv and the conv itself."""
    table = {}
    for letter in "abc":
        table[f"{name}.norm_{letter}.weight"] = f"{npz_prefix}{letter}/group_norm/gamma"
        table[f"{name}.norm_{letter}.bias"] = f"{npz_prefix}{letter}/group_norm/beta"
        table[f"{name}.conv_{letter}.weight"] = f"{npz_prefix}{letter}/standardized_conv2d/kernel"
    if unit.proj is not None:
        table[f"{name}.proj.weight"] = f"{npz_prefix}a/proj/standardized_conv2d/kernel"
    return table


def npz_key_table(model: ResNetV2) -> dict[str, str]:
    """Parameter name in `model` -> key in an official BiT .npz (all under `resnet/`)."""
    table = {
        "root.conv.weight": "resnet/root_block/standardized_conv2d/kernel",
        "head.norm.weight": "resnet/group_norm/gamma",
        "head.norm.bias": "resnet/group_norm/beta",
        "head.conv.weight": "resnet/head/conv2d/kernel",
        "head.conv.bias": "resnet/head/conv2d/bias",
    }
    for stage_name, stage in model.body.named_children():
        for unit_name, unit in stage.named_children():
            name = f"body.{stage_name}.{unit_name}"
            table.update(unit_key_table(name, f"resnet/{stage_name}/{unit_name}/", unit))
    return table


def tf_to_torch(array: np.ndarray) -> torch.Tensor:
    """TensorFlow conv kernels are HWIO, PyTorch's are OIHW; vectors are shared as they are."""
    if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file (expected an official BiT .npz such as BiT-S-R50x1.npz)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"--pretrained {path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def load_bit_npz(model: ResNetV2, path) -> dict:
    """Copy an official BiT .npz into `model`; the head is skipped when its size differs.

    A skipped head is zero-initialised, as BiT fine-tuning does. Returns {"loaded": [...],
    "skipped": [...]} with parameter names.
    """
    path = Path(path)
    params = dict(model.named_parameters())
    loaded, skipped = [], []
    table = npz_key_table(model)
    with read_npz(path) as weights:
        require_keys(weights, table.values(), path)
        head_fits = weights["resnet/head/conv2d/kernel"].shape[-1] == model.head.conv.out_channels
        for name, key in table.items():
            if name.startswith(HEAD_PREFIX) and not head_fits:
                skipped.append(name)
                continue
            value, target = tf_to_torch(weights[key]), params[name]
            if value.shape != target.shape:
                raise UserError(f"--pretrained {path}: {key!r} has shape {tuple(value.shape)}, "
                                f"expected {tuple(target.shape)} (both after HWIO -> OIHW)")
            with torch.no_grad():
                target.copy_(value)
            loaded.append(name)
    if skipped:
        zero_head(model)
    return {"loaded": loaded, "skipped": skipped}


def require_keys(weights, keys, path: Path) -> None:
    # All missing keys counted at once: a wrong file gives one clear message, not one key a time.
    missing = [key for key in keys if key not in weights.files]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"--pretrained {path}: missing key {missing[0]!r}{more} (not an official BiT-S/M-R50x1 .npz?)")


def zero_head(model: ResNetV2) -> None:
    with torch.no_grad():
        nn.init.zeros_(model.head.conv.weight)
        nn.init.zeros_(model.head.conv.bias)
