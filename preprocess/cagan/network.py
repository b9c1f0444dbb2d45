"""The DeepFill v1 generator (Yu et al., "Generative Image Inpainting with Contextual Attention",
CVPR 2018) in PyTorch, laid out so the released TensorFlow checkpoints load one to one.

Layers keep their TF names (`conv1` … `allconv17`) inside five branches:

    TF variable (HWIO kernels)                          state_dict key (OIHW weights)
    inpaint_net/<layer>/kernel, .../bias                <branch>.<layer>.weight, .bias
    inpaint_net/<layer>/<layer>_conv/kernel, .../bias   <branch>.<layer>.weight, .bias
        (the second form for the `gen_deconv` layers, whose names end in `_upsample`)

    branch         layers                                 role
    coarse         conv1 … conv17                         stage 1: the coarse fill
    dilated        xconv1 … xconv10_atrous                stage 2: dilated-conv branch
    attention_in   pmconv1 … pmconv6                      stage 2: features to attend over
    attention_out  pmconv9, pmconv10                      stage 2: after contextual attention
    merge          allconv11 … allconv17                  stage 2: both branches -> image

A kernel maps to a weight by `kernel.transpose(3, 2, 0, 1)`; biases copy as they are
(`weights.generator_state_from_tf` does this, checks every shape, and converts the released
models from the BGR they were trained on to the RGB this network is fed).

Differences from the official code, on purpose: each image of a batch uses its own mask in
contextual attention (the official graph took the first image's), and the forward pass blanks
the hole itself (the official caller passed the image already multiplied by 1 - mask).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cfrobust.preprocess.cagan.attention import contextual_attention, pad_same, resize_nearest

RGB = "rgb"  # output width of the last layers: the 3 image channels, whatever cnum is
INPUT_CHANNELS = 5  # image, a ones plane, the mask

# (TF layer name, output channels in units of cnum, kernel, stride, dilation, activation).
# Names ending in "_upsample" are the official `gen_deconv`: nearest 2x upsample, then the conv.
COARSE = (
    ("conv1", 1, 5, 1, 1, "elu"),
    ("conv2_downsample", 2, 3, 2, 1, "elu"),
    ("conv3", 2, 3, 1, 1, "elu"),
    ("conv4_downsample", 4, 3, 2, 1, "elu"),
    ("conv5", 4, 3, 1, 1, "elu"),
    ("conv6", 4, 3, 1, 1, "elu"),
    ("conv7_atrous", 4, 3, 1, 2, "elu"),
    ("conv8_atrous", 4, 3, 1, 4, "elu"),
    ("conv9_atrous", 4, 3, 1, 8, "elu"),
    ("conv10_atrous", 4, 3, 1, 16, "elu"),
    ("conv11", 4, 3, 1, 1, "elu"),
    ("conv12", 4, 3, 1, 1, "elu"),
    ("conv13_upsample", 2, 3, 1, 1, "elu"),
    ("conv14", 2, 3, 1, 1, "elu"),
    ("conv15_upsample", 1, 3, 1, 1, "elu"),
    ("conv16", 0.5, 3, 1, 1, "elu"),
    ("conv17", RGB, 3, 1, 1, None),
)
DILATED = (
    ("xconv1", 1, 5, 1, 1, "elu"),
    ("xconv2_downsample", 1, 3, 2, 1, "elu"),
    ("xconv3", 2, 3, 1, 1, "elu"),
    ("xconv4_downsample", 2, 3, 2, 1, "elu"),
    ("xconv5", 4, 3, 1, 1, "elu"),
    ("xconv6", 4, 3, 1, 1, "elu"),
    ("xconv7_atrous", 4, 3, 1, 2, "elu"),
    ("xconv8_atrous", 4, 3, 1, 4, "elu"),
    ("xconv9_atrous", 4, 3, 1, 8, "elu"),
    ("xconv10_atrous", 4, 3, 1, 16, "elu"),
)
ATTENTION_IN = (
    ("pmconv1", 1, 5, 1, 1, "elu"),
    ("pmconv2_downsample", 1, 3, 2, 1, "elu"),
    ("pmconv3", 2, 3, 1, 1, "elu"),
    ("pmconv4_downsample", 4, 3, 2, 1, "elu"),
    ("pmconv5", 4, 3, 1, 1, "elu"),
    ("pmconv6", 4, 3, 1, 1, "relu"),
)
ATTENTION_OUT = (
    ("pmconv9", 4, 3, 1, 1, "elu"),
    ("pmconv10", 4, 3, 1, 1, "elu"),
)
MERGE = (
    ("allconv11", 4, 3, 1, 1, "elu"),
    ("allconv12", 4, 3, 1, 1, "elu"),
    ("allconv13_upsample", 2, 3, 1, 1, "elu"),
    ("allconv14", 2, 3, 1, 1, "elu"),
    ("allconv15_upsample", 1, 3, 1, 1, "elu"),
    ("allconv16", 0.5, 3, 1, 1, "elu"),
    ("allconv17", RGB, 3, 1, 1, None),
)
ACTIVATIONS = {"elu": F.elu, "relu": F.relu, None: lambda x: x}


class GenConv(nn.Conv2d):
    """The official `gen_conv`: a convolution with TF 'SAME' padding, then ELU (or the given
    activation). With `upsample`, the official `gen_deconv`: TF's nearest 2x resize first."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, dilation=1, activation="elu", upsample=False):
        # Stride 1 with an odd kernel: TF 'SAME' is symmetric, so the conv pads by itself.
        # Stride 2: TF pads the odd leftover at the bottom/right, done by hand in forward.
        padding = dilation * (kernel - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel, stride, padding, dilation)
        self.activation = activation
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = resize_nearest(x, (2 * x.shape[-2], 2 * x.shape[-1]))
        if self.stride[0] > 1:
            x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return ACTIVATIONS[self.activation](super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, upsample={self.upsample}"


def build_branch(table, in_channels: int, cnum: int) -> nn.Sequential:
    """The layers of `table`, in order, named as TF named them."""
    layers = OrderedDict()
    for name, width, kernel, stride, dilation, activation in table:
        out_channels = 3 if width == RGB else int(width * cnum)
        upsample = name.endswith("_upsample")
        layers[name] = GenConv(in_channels, out_channels, kernel, stride, dilation, activation, upsample)
        in_channels = out_channels
    return nn.Sequential(layers)


class Generator(nn.Module):
    """Two-stage inpainting generator: coarse fill, then refinement with contextual attention.

    forward(image N×3×H×W in [-1, 1], mask N×1×H×W with 1 = hole) -> (coarse, refined), both
    N×3×H×W in [-1, 1]; H and W must be multiples of 8. Only the hole of either output is
    meant to be used: paste it into the image.
    """

    def __init__(self, cnum: int = 32):
        super().__init__()
        self.cnum = cnum
        self.meta: dict = {}  # what the weight file says about the training (image size, source)
        self.coarse = build_branch(COARSE, INPUT_CHANNELS, cnum)
        self.dilated = build_branch(DILATED, INPUT_CHANNELS, cnum)
        self.attention_in = build_branch(ATTENTION_IN, INPUT_CHANNELS, cnum)
        self.attention_out = build_branch(ATTENTION_OUT, 4 * cnum, cnum)
        self.merge = build_branch(MERGE, 8 * cnum, cnum)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(f"CAGAN needs image sides that are multiples of 8, got {height}x{width}")
        mask = mask.to(image.dtype)
        image = image * (1 - mask)  # the hole's content must never reach the network
        ones = torch.ones_like(mask)

        coarse = self.coarse(torch.cat([image, ones, mask], 1)).clamp(-1, 1)
        pasted = torch.cat([coarse * mask + image * (1 - mask), ones, mask], 1)

        # Attention runs on the 1/4-resolution features (the mask resized like them).
        attended = contextual_attention(self.attention_in(pasted), resize_nearest(mask, (height // 4, width // 4)))
        both = torch.cat([self.dilated(pasted), self.attention_out(attended)], 1)
        refined = self.merge(both).clamp(-1, 1)
        return coarse, refined
