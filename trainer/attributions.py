"""Attribution maps that replace the input gradient g in the saliency penalty (--reg-grad
deeplift, grad_cam), differentiable in the model's weights so the penalty trains through them.
"""

# Official counterparts: zzzace2000/robust_cls_model, arch/saliency_utils.py (`get_deeplift`,
# `get_grad_cam`) and arch/myhack.py.

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cfrobust.trainer.module_modes import evaluation_mode, running_statistics_frozen, unwrap

# Elementwise nonlinearities that captum's DeepLift gives the rescale rule.
RESCALED = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


def grad_cam(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """captum LayerGradCam of each sample's target on the model's Grad-CAM layer, upsampled
    bilinearly to the input size: [B, 1, H, W], as the official get_grad_cam (no ReLU); the
    running statistics of BatchNorm are left alone.

    captum passes grad_kwargs to its torch.autograd.grad, so create_graph=True makes the map
    differentiable without the official code's patching of torch.autograd.grad.
    """
    from captum.attr import LayerGradCam  # captum imports matplotlib: only when asked for

    bare = unwrap(model)
    # BatchNorm as in the step's forward pass (batch statistics, so DDP ranks and --batch-split
    # chunks agree), without counting the batch into the running statistics a second time.
    with running_statistics_frozen(bare), torch.enable_grad():
        maps = LayerGradCam(bare, grad_cam_layer(bare)).attribute(
            images.detach(), target=labels, grad_kwargs={"create_graph": True}
        )
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear")


def grad_cam_layer(model: nn.Module) -> nn.Module:
    """The model's own choice (a `grad_cam_layer()` method, as the official models'
    get_grad_cam_layer) or else its last nn.Conv2d."""
    chosen = getattr(model, "grad_cam_layer", None)
    if isinstance(chosen, nn.Module):
        return chosen
    if callable(chosen):
        return chosen()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("--reg-grad grad_cam needs a model with an nn.Conv2d layer")
    return convs[-1]


def deeplift(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """DeepLift (rescale rule) of each sample's target logit against a zero baseline (the
    dataset-mean image): x * multipliers, the value captum.attr.DeepLift computes.

    Computed here with torch.autograd.grad rather than through captum: captum's DeepLift keeps
    its per-module state in tensor hooks that fire again, and fail, when the penalty is
    backpropagated a second time (the official code patches captum and torch.autograd.grad to
    get around it), and it cannot handle a module used twice (torchvision ResNets reuse ReLUs).

    Two forward passes: the first, on [images; baselines] as in captum, gives every nonlinearity
    call its multiplier (out - out_ref) / (in - in_ref) as a function of the weights; the second,
    on the images alone, gives each call that multiplier as its gradient, so the attribution's
    own gradient in the weights is exact. Max-pooling and functional activations pass their
    ordinary gradient (captum has a max-pool rule and cannot hook functional calls either).
    BatchNorm runs in eval mode, so a sample's attribution does not depend on the rest of the
    batch and the baseline does not leak into the running statistics.
    """
    bare = unwrap(model)
    inputs = images.detach().requires_grad_(True)
    with evaluation_mode(bare, (_BatchNorm,)), torch.enable_grad():
        with _Multipliers(bare, eps) as multipliers:
            bare(torch.cat([images.detach(), torch.zeros_like(images)]))
        with _RescaledGradients(bare, multipliers.slopes):
            logits = bare(inputs)
        score = logits.gather(1, labels[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, inputs, create_graph=True)
    return images.detach() * gradient


class _NonlinearityHooks:
    """Pre/forward hooks on every RESCALED module while active; sees each call's input (before an
    in-place activation overwrites it) and output."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for module in self.model.modules():
            if isinstance(module, RESCALED):
                self.handles.append(module.register_forward_pre_hook(self._keep_input))
                self.handles.append(module.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.inputs.clear()

    def _keep_input(self, module, args):
        self.inputs[module] = args[0]
        # An in-place activation would overwrite the input we need; give it a copy instead.
        return (args[0].clone(),) if getattr(module, "inplace", False) else None

    def _after(self, module, args, out):
        return self.on_call(self.inputs.pop(module), out)

    def on_call(self, z: torch.Tensor, out: torch.Tensor):
        raise NotImplementedError


class _Multipliers(_NonlinearityHooks):
    """Records, call by call, the rescale multiplier of the image half of a [images; baselines]
    batch and where it is undefined (input equal to the reference input)."""

    def __init__(self, model: nn.Module, eps: float):
        super().__init__(model)
        self.eps = eps
        self.slopes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_call(self, z, out):
        half = len(z) // 2
        delta_in = z[:half] - z[half:]
        flat = delta_in.abs() < self.eps
        slope = (out[:half] - out[half:]) / torch.where(flat, torch.ones_like(delta_in), delta_in)
        self.slopes.append((slope, flat))
        return None


class _RescaledGradients(_NonlinearityHooks):
    """Gives the n-th nonlinearity call the n-th recorded multiplier as its gradient (its own
    gradient where the multiplier is undefined) and keeps its output value."""

    def __init__(self, model: nn.Module, slopes: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(model)
        self.slopes = iter(slopes)

    def on_call(self, z, out):
        slope, flat = next(self.slopes)
        # out.detach() carries the value; z - z.detach() is zero but has gradient 1, times slope.
        return torch.where(flat, out, out.detach() + slope * (z - z.detach()))
