"""--reg-impl finite-diff against exact on real batches: the cosine and norm ratio of the weight
gradients the two give, per loss term, at initialisation and at each checkpoint named.

    python bench/reg_impl_check.py --shards ROOT [--checkpoint RUN/checkpoints/last.pt ...]
                                   [--batches 3] [--set KEY=VALUE ...] [--warmup-epochs 1]
                                   [--eps 1e-2,1e-3] [--terms sal]

The options are the recipe's (--cf tile --f mrand --reg bbox_o, every other at the CLI's
default) with --set's changes; the model is in training mode, as in a step, and its state is
restored before each gradient, so both implementations start from the same running statistics.
--warmup-epochs N trains the fresh model N epochs first, without the penalty (as the recipe's
ramp starts), and compares on the next epoch's batches: early in training, where the step size
matters most. --eps compares fp32 step sizes (default: the trainer's).
tests/test_reg_impl.py checks the same on hand-made batches; this shows it on a user's data and
on a trained network, where a difference between the two would change what training does.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cfrobust.openmp_spin import shorten_openmp_spin

shorten_openmp_spin()  # as `cfrobust` does before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from robustness import RECIPE, parse_sets  # noqa: E402
from cfrobust.distributed import setup_distributed  # noqa: E402
from cfrobust.shards.reader import make_loader, split_info  # noqa: E402
from cfrobust.trainer.checkpoint import load_checkpoint  # noqa: E402
from cfrobust.trainer.config import TrainConfig  # noqa: E402
from cfrobust.trainer.hvp import STEP_EPS  # noqa: E402
from cfrobust.trainer.objective import Objective  # noqa: E402
from cfrobust.trainer.pixels import using_normalization  # noqa: E402
from cfrobust.trainer.train import build_training, optimizer_step  # noqa: E402


def weight_gradient(model, config: TrainConfig, batch, terms: list[str], num_classes: int) -> torch.Tensor:
    """The gradient of the named terms' sum, all parameters flattened; the model's state (running
    statistics) is as before afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    values, _ = Objective(config, torch.Generator().manual_seed(0), num_classes=num_classes)(model, batch)
    sum(values[t] for t in terms).backward()
    model.load_state_dict(state)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def term_groups(config: TrainConfig, wanted: str | None) -> list[list[str]]:
    other = ["ce", "cf"] if config.cf != "none" else ["ce"]
    groups = [["sal"], other, other + ["sal"]]
    return [g for g in groups if wanted is None or " + ".join(g) == wanted]


def warm_up(config: TrainConfig, info: dict, env, epochs: int):
    """The fresh model after `epochs` epochs of the run without the penalty, and the data stream."""
    model, data, parts = build_training(replace(config, reg="none"), info, env)
    model.train()
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for batch in make_loader(data, 0):
            optimizer_step(parts, parts.augmentation(batch, epoch))  # as train_one_epoch steps
    data.set_epoch(epochs)
    return model, data, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint to compare at (repeatable)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train option")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="train the fresh model this long first")
    parser.add_argument("--eps", default=None, help="comma-separated fp32 step sizes (default: the trainer's)")
    parser.add_argument("--terms", default=None, help="one group only: sal, ce + cf or ce + cf + sal")
    args = parser.parse_args()
    options = {**RECIPE, **parse_sets(args.set)}
    if args.checkpoint:  # the architecture the checkpoints were trained with
        options.setdefault("arch", load_checkpoint(args.checkpoint[0])["config"]["arch"])
    config = TrainConfig(shards=args.shards, out="", workers=0, **{"arch": "simple-cnn", **options})
    if config.reg == "none":
        raise SystemExit("--set reg=none: there is no saliency penalty to compare")
    env = setup_distributed("cpu")
    info = split_info(Path(args.shards) / "train")
    with using_normalization(config.normalize):
        model, data, parts = warm_up(config, info, env, args.warmup_epochs)
        loader = iter(make_loader(data, 0))
        batches = [parts.augmentation(next(loader), args.warmup_epochs) for _ in range(args.batches)]  # as a step sees them
        steps = [float(e) for e in args.eps.split(",")] if args.eps else [STEP_EPS[torch.float32]]
        print(f"{config.arch}, options {options}; weight gradients of finite-diff against exact, training mode")
        print("| weights | batch | terms | fp32 step | cosine | norm ratio (finite-diff / exact) |")
        print("|---|---|---|---|---|---|")
        start = f"after {args.warmup_epochs} epoch(s)" if args.warmup_epochs else "init"
        for name in [start, *args.checkpoint]:
            if name != start:
                model.load_state_dict(load_checkpoint(name)["model"])
            model.train()
            for index, batch in enumerate(batches):
                for terms in term_groups(config, args.terms):
                    compare(model, config, batch, terms, len(info["classes"]), steps, f"| {name} | {index} | {' + '.join(terms)}")


def compare(model, config: TrainConfig, batch, terms: list[str], classes: int, steps: list[float], row: str) -> None:
    exact = weight_gradient(model, replace(config, reg_impl="exact"), batch, terms, classes)
    default = STEP_EPS[torch.float32]
    for eps in steps:
        STEP_EPS[torch.float32] = eps
        try:
            finite = weight_gradient(model, replace(config, reg_impl="finite-diff"), batch, terms, classes)
        finally:
            STEP_EPS[torch.float32] = default
        cosine = F.cosine_similarity(exact.double(), finite.double(), dim=0).item()  # fp32 sums overshoot 1
        print(f"{row} | {eps:g} | {cosine:.4f} | {(finite.norm() / exact.norm()).item():.3f} |", flush=True)


if __name__ == "__main__":
    main()
