"""The saliency penalty's weight gradient without double backpropagation (--reg-impl finite-diff):
a Hessian-vector product taken by a finite difference of first-order gradients.
"""

# A penalty P = Phi(g) of the input gradient g = d s(x) / d x of a scalar score s has the weight
# gradient dP/dtheta = d/dtheta <g, v> with v = dPhi/dg held constant, and <g, v> is the
# directional derivative of s along v: (s(x + h v) - s(x)) / h + O(h). So the surrogate
# (s(x + h v) - s(x)) / h, added to the loss with its value swapped for P, has P's weight
# gradient up to O(h), for one more first-order forward/backward instead of a backward through
# the backward (Finlay & Oberman 2019, "Scaleable input gradient regularization for adversarial
# robustness"). The first-order backward that gives g also gives d s(x) / dtheta, which enters
# the loss as a linear term, so only x + h v needs a backward in the step's one backward. It
# holds for every penalty that is a differentiable function of g: bbox_o (share and raw),
# bbox_f1 and gs; not for deeplift (a modified backward) or grad_cam (a layer's gradient),
# which are not input gradients of a score.
#
# Step size: h makes the step as long as eps times the input, |h v| = eps |x|, one h for the
# whole batch. Relative to |x| because the model's nonlinearity sets the truncation error on the
# scale of its inputs; relative to |v| because v's size is the penalty's business (share's v
# grows as g shrinks, raw's as g grows), not the model's. One h rather than one per sample
# because BatchNorm in training mode couples the samples of a batch: a per-sample step would
# weigh the coupling terms h_j / h_i wrongly. eps balances truncation (grows with eps) against
# the rounding of the two nearly equal gradients (grows as unit roundoff / eps); cosine with the
# fp32 exact gradient: on a freshly initialised four-block CNN (tests/test_reg_impl.py's model
# and batch) fp32 1e-3 gives 0.9999+ (1e-2: 0.998, 1e-1: 0.86); after one epoch of the recipe on
# four-class (bench/reg_impl_check.py --warmup-epochs 1 --terms sal --batches 4) the eight-block
# simple-cnn gives 1.0000 at 1e-3 and 0.9986-0.9991 at 1e-2, but ResNet-50 0.54-0.998 at 1e-3,
# 0.991-0.9996 at 1e-2 (1e-1: 0.90-0.995; 1e-4: 0.06-0.37, rounding). fp32 takes 1e-2, which
# costs the small net some truncation (penalty alone at initialisation: 0.977-0.980 against
# 0.9998 at 1e-3) to keep ResNet-50 out of rounding; a per-architecture step is not built.
# Under bf16 autocast (rounding at 2^-8) 2e-2 does best on the test model, 0.95-0.99 (1e-2 and
# 5e-2 lower); under fp16 (2^-11) 1e-2, 0.99-0.997.
#
# The same product exactly by forward-over-reverse (torch.func.jvp of the weight gradient along
# v) carries a tangent through a forward and a backward: 4.6x a first-order pass on the
# simple-cnn and 3.7x on resnet18 on the CPU, against this route's 2x (bench/hvp_cost.py), so it
# is not offered.

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

REG_IMPLS = ("exact", "finite-diff")
STEP_EPS = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Under fp16 autocast the backward of the score runs in fp16 and a map of per-pixel gradients
# underflows there (below 6e-8 it is 0): the score is scaled up for that backward and g scaled back.
FP16_SCORE_SCALE = 1024.0


class ActivationPattern(TorchFunctionMode):
    """While active, records which units each ReLU call lets through and which input each 2-d
    max pooling picks (modules and functional calls alike); `replay()` then makes the same calls,
    in the same order, apply the recorded choices to their input instead.

    The exact product differentiates ReLU as the constant pattern of the step's forward pass (its
    second derivative is 0); a plain finite difference lets units near 0 switch over the step,
    and each switch adds a jump of O(1) / h to the difference (on a BatchNorm + ReLU network
    that bias dwarfs the product: cosine 0.05 with the exact one on a four-block CNN). With the pattern
    held, x -> s is smooth along the step (BatchNorm's statistics and log-softmax are what
    remain nonlinear) and the difference matches the exact product closely even at large h.
    2-d max pooling's choices are held the same way (resnet18's stem: with them free, cosine 0.37).
    Other piecewise functions (hardtanh, leaky ReLU, max over other dims) are differenced as they are."""

    RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
    MAX_POOLS = ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices")

    def _max_pool(self, args, kwargs):
        """2-d max pooling: records the chosen inputs (their indices), or replays them."""
        kwargs = dict(kwargs)
        want_indices = kwargs.pop("return_indices", False) or (len(args) > 6 and args[6])
        args = args[:6]
        if self._replaying is None:
            out, indices = F.max_pool2d_with_indices(*args, **kwargs)
            self.records.append(indices)
        else:
            indices = self._next()
            out = args[0].flatten(2).gather(2, indices.flatten(2)).view_as(indices)
        return (out, indices) if want_indices else out

    def _next(self) -> torch.Tensor:
        recorded = next(self._replaying, None)
        if recorded is None:
            raise RuntimeError("the perturbed pass made more ReLU calls than the recorded pass")
        return recorded

    def __init__(self):
        super().__init__()
        self.records: list[torch.Tensor] = []
        self._replaying = None

    @contextmanager
    def replay(self):
        """The recorded pattern, for one more forward pass of a batch of the same shape."""
        self._replaying = iter(self.records)
        try:
            with self:
                yield self
        finally:
            self._replaying = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.MAX_POOLS:
            return self._max_pool(args, kwargs)
        if func not in self.RELUS:
            return func(*args, **kwargs)
        if self._replaying is None:
            out = func(*args, **kwargs)
            # The output itself is the record (positive where the unit passes): no mask to compute,
            # and autograd, which keeps it for ReLU's backward, would refuse a later in-place change.
            # It costs memory: pass 1's ReLU outputs stay alive through pass 2 (a bool mask took a
            # quarter of that in fp32, but cost a comparison here and a cast at the replay).
            self.records.append(out.detach())
            return out
        # z where the recorded output is positive, else 0: ReLU's own backward kernel, one fused
        # pass (on the CPU a bool mask's masked_fill or where ran 5-10x slower than ReLU).
        # A ReLU called in place is replayed out of place; modules use its return value.
        return torch.ops.aten.threshold_backward(args[0], self._next(), 0)


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype the model computes in here: the autocast dtype when autocast is on, else fp32."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


def score_scale(device_type: str) -> float:
    """The factor the score is multiplied by before its input gradient is taken (fp16: underflow)."""
    return FP16_SCORE_SCALE if autocast_dtype(device_type) == torch.float16 else 1.0


def value_and_direction(penalty, grads: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """P = penalty(g, ...) and v = dP/dg at the given g, both detached, computed in fp32."""
    leaf = grads.detach().float().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(grads.device.type, enabled=False):
        value = penalty(leaf, *args, **kwargs)
        (direction,) = torch.autograd.grad(value, leaf, allow_unused=True)
    return value.detach(), torch.zeros_like(leaf) if direction is None else direction


def step_size(inputs: torch.Tensor, direction: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, 1 / h) as 0-d tensors (no host sync) with |h v| = eps |x| over the batch. A zero v
    (no boxed sample, a flat penalty) gives 1/h = 0: no step and no gradient."""
    scale = inputs.detach().float().norm().clamp(min=1e-12)
    length = direction.norm()
    step = eps * scale / length.clamp(min=1e-30)
    return step, length / (eps * scale)


def push_forward(outputs: torch.Tensor, inputs: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """d outputs / d inputs applied to `tangent` (a Jacobian-vector product by two vector-Jacobian
    products). Used on the cheap map from x to the model's input rows (concatenation, GridMask),
    so the step reaches exactly the rows, and pixels, that x reaches."""
    if outputs is inputs:
        return tangent
    dummy = torch.zeros_like(outputs, requires_grad=True)
    (pulled,) = torch.autograd.grad(outputs, inputs, dummy, create_graph=True)
    (pushed,) = torch.autograd.grad(pulled, dummy, tangent)
    return pushed


def finite_difference_term(value: torch.Tensor, perturbed: torch.Tensor, reference: torch.Tensor,
                           inverse_step: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is the penalty P and whose weight gradient is that of
    (s(x + h v) - s(x)) / h, i.e. dP/dtheta up to O(h)."""
    surrogate = (perturbed - reference) * inverse_step
    return value + (surrogate - surrogate.detach())
