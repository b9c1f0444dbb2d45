"""--reg-impl finite-diff against exact on real batches: the cosine and norm ratio of the weight
gradients the two give, per loss term, at initialisation and at each checkpoint named.

    python bench/reg_impl_check.py --shards ROOT [--checkpoint RUN/checkpoints/last.pt ...]
                                   [--batches 3] [--set KEY=VALUE ...]

The options are the recipe's (--cf tile --f mrand --reg bbox_o, every other at the CLI's
default) with --set's changes; the model is in training mode, as in a step, and its state is
restored before each gradient, so both implementations start from the same running statistics.
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
from cfrobust.trainer.objective import Objective  # noqa: E402
from cfrobust.trainer.train import build_training  # noqa: E402


def weight_gradient(model, config: TrainConfig, batch, terms: list[str], num_classes: int) -> torch.Tensor:
    """The gradient of the named terms' sum, all parameters flattened; the model's state (running
    statistics) is as before afterwards."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    values, _ = Objective(config, torch.Generator().manual_seed(0), num_classes=num_classes)(model, batch)
    sum(values[t] for t in terms).backward()
    model.load_state_dict(state)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def term_groups(config: TrainConfig) -> list[list[str]]:
    other = ["ce", "cf"] if config.cf != "none" else ["ce"]
    return [["sal"], other, other + ["sal"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint to compare at (repeatable)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train option")
    args = parser.parse_args()
    options = {**RECIPE, **parse_sets(args.set)}
    if args.checkpoint:  # the architecture the checkpoints were trained with
        options.setdefault("arch", load_checkpoint(args.checkpoint[0])["config"]["arch"])
    config = TrainConfig(shards=args.shards, out="", workers=0, **{"arch": "simple-cnn", **options})
    if config.reg == "none":
        raise SystemExit("--set reg=none: there is no saliency penalty to compare")
    env = setup_distributed("cpu")
    info = split_info(Path(args.shards) / "train")
    model, data, parts = build_training(config, info, env)
    loader = iter(make_loader(data, 0))
    batches = [next(loader) for _ in range(args.batches)]
    if parts.augmentation.active:  # as a step sees them
        batches = [parts.augmentation(batch, 0) for batch in batches]
    classes = len(info["classes"])
    print(f"{config.arch}, options {options}; weight gradients of finite-diff against exact, training mode")
    print("| weights | batch | terms | cosine | norm ratio (finite-diff / exact) |")
    print("|---|---|---|---|---|")
    for name in ["init", *args.checkpoint]:
        if name != "init":
            model.load_state_dict(load_checkpoint(name)["model"])
        model.train()
        for index, batch in enumerate(batches):
            for terms in term_groups(config):
                exact = weight_gradient(model, replace(config, reg_impl="exact"), batch, terms, classes)
                finite = weight_gradient(model, replace(config, reg_impl="finite-diff"), batch, terms, classes)
                cosine = F.cosine_similarity(exact.double(), finite.double(), dim=0).item()  # fp32 sums overshoot 1
                ratio = (finite.norm() / exact.norm()).item()
                print(f"| {name} | {index} | {' + '.join(terms)} | {cosine:.4f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
