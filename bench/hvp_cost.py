"""What the saliency penalty's weight gradient costs by each route, against one first-order pass.

    python bench/hvp_cost.py [--arch simple-cnn] [--batch 64] [--size 64] [--repeats 6] [--threads 1]

The penalty's weight gradient is the Hessian-vector product d/dtheta <d s / d x, v> of a score s
(here the target logit, as --reg-grad grad_y). Three ways to take it, each timed from the images
to the weight gradient, as a ratio to one first-order forward and backward (the weights' and the
input's gradient of s) measured in the same run:

- double_backward: --reg-impl exact, the input gradient with its graph, then a backward through it;
- finite_diff: --reg-impl finite-diff, a second first-order pass at x + h v (two passes in all);
- jvp: forward-over-reverse, torch.func.jvp of the weight-gradient function along v, the route
  PyTorch's docs suggest for Hessian-vector products (not offered by the trainer: see README).

BatchNorm runs in training mode with its running statistics frozen, as in the trainer's extra pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, grad, jvp

from cfrobust.trainer.models import build_model
from cfrobust.trainer.module_modes import running_statistics_frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.arange(args.batch) % 2
    v = torch.randn_like(x)
    model = build_model(args.arch, 2).train()
    weights = [p for p in model.parameters() if p.requires_grad]
    detached = {name: p.detach() for name, p in model.named_parameters()}

    def score(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).gather(1, y[:, None]).sum()

    def first_order(inputs: torch.Tensor = x):
        leaf = inputs.clone().requires_grad_(True)
        return torch.autograd.grad(score(leaf), [leaf, *weights], allow_unused=True)

    def double_backward():
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(score(leaf), leaf, create_graph=True)
        return torch.autograd.grad((g * v).sum(), weights, allow_unused=True)

    def finite_diff():
        first_order(x)
        return first_order(x + 1e-2 * v)

    def functional_score(params, inputs):
        return functional_call(model, params, (inputs,)).gather(1, y[:, None]).sum()

    def forward_over_reverse():
        return jvp(lambda inputs: grad(functional_score)(detached, inputs), (x,), (v,))[1]

    routes = {"first_order": first_order, "double_backward": double_backward, "finite_diff": finite_diff,
              "jvp": forward_over_reverse}
    times: dict[str, list[float]] = {name: [] for name in routes}
    with running_statistics_frozen(model):
        for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, route in routes.items():  # interleaved, so a slow spell hits every route
                start = time.perf_counter()
                route()
                if repeat:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["first_order"])
    print(f"{args.arch}, batch {args.batch}, {args.size} px, {args.threads} thread(s), median of {args.repeats}")
    for name, measured in times.items():
        print(f"{name:16s} {statistics.median(measured):.3f} s  {statistics.median(measured) / base:.2f}x first-order")


if __name__ == "__main__":
    main()
