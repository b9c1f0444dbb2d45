"""The training loop, the same for one process and for torchrun on many GPUs and nodes.

    cfrobust train --shards S --out RUN --arch resnet50 --cf tile --f mrand --reg bbox_o
    torchrun --nproc_per_node=8 -m cfrobust train --shards S --out RUN ...
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
             --rdzv_endpoint=HOST:29500 -m cfrobust train --shards S --out RUN ...

Under torchrun every process trains on its own slice of the shards with `--batch` images per
step (global batch = batch x processes), gradients are averaged by DDP, and rank 0 alone writes
the run folder. The best weights (by validation accuracy) are scored on every non-train split
into RUN/eval.json.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cfrobust.errors import UserError
from cfrobust.shards.manifest import list_splits
from cfrobust.shards.reader import TrainShards, make_loader, split_info
from cfrobust.trainer.checkpoint import save_checkpoint
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.distributed import DistEnv, setup_distributed, sync_buffers, teardown_distributed
from cfrobust.trainer.evaluate import eval_document, evaluate_splits, write_json
from cfrobust.trainer.fills import ONLINE_FILLS
from cfrobust.trainer.models import build_model
from cfrobust.trainer.objective import Objective

PROGRESS_EVERY = 10  # steps between progress-bar loss updates (each one syncs the device)


def train(config: TrainConfig) -> dict:
    """Run the whole job; returns the eval document (identical on every rank)."""
    env = setup_distributed(config.device)
    try:
        document, _model = train_in(env, config)
        return document
    finally:
        teardown_distributed()


def train_in(env: DistEnv, config: TrainConfig):
    """Train inside an initialised process group; returns (eval document, best model)."""
    splits, info = training_manifest(config)
    out = Path(config.out)
    if env.is_main:
        prepare_run_folder(out, config)
    model, ddp_model = make_model(config, len(info["classes"]), env)
    data = TrainShards(
        Path(config.shards) / "train",
        config.batch,
        [config.cf] if config.cf != "none" and not config.cf_online else [],
        config.seed,
        env.rank,
        env.world_size,
        config.workers,
    )
    optimizer, scheduler = make_optimizer(model, config, total_steps=len(data) * config.epochs)
    # Augmentation randomness differs per rank (each sees other images) but is seeded.
    objective = Objective(config, torch.Generator(env.device).manual_seed(config.seed * 1000 + env.rank))
    loader = make_loader(data, config.workers, pin_memory=env.device.type == "cuda")
    select_on = selection_split(splits)
    best = {"score": -math.inf, "epoch": 0, "state": None}
    for epoch in range(1, config.epochs + 1):
        data.set_epoch(epoch - 1)
        stats = train_one_epoch(ddp_model, objective, loader, optimizer, scheduler, env, epoch, config.epochs)
        sync_buffers(model, env)  # BatchNorm statistics drift apart per rank; keep rank 0's
        record = {"epoch": epoch, "step": epoch * len(data), **stats}
        if select_on:
            val = evaluate_splits(model, config.shards, [select_on], env, batch_size=2 * config.batch)[select_on]
            record["val"] = {k: val[k] for k in ("accuracy", "loss", "worst_group_accuracy", "mean_group_accuracy")}
            record["val"]["split"] = select_on
        score = record["val"]["accuracy"] if "val" in record else epoch  # without val: the last epoch
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
        if env.is_main:
            state = checkpoint_state(model, optimizer, scheduler, config, info, epoch, record["step"])
            save_epoch(out, record, state, is_best=best["epoch"] == epoch)
    model.load_state_dict(best["state"])
    eval_splits = [s for s in splits if s != "train"]
    results = evaluate_splits(model, config.shards, eval_splits, env, batch_size=2 * config.batch)
    document = eval_document(out / "checkpoints" / "best.pt", config.to_dict(), results, config.shards)
    document["best_epoch"] = best["epoch"]
    if env.is_main:
        write_json(out / "eval.json", document)
    return document, model


def training_manifest(config: TrainConfig) -> tuple[list[str], dict]:
    """The split names under --shards and the train split's manifest, checked against the config."""
    splits = list_splits(config.shards)
    if "train" not in splits:
        raise UserError(f"{config.shards}: no train/ split to train on")
    info = split_info(Path(config.shards) / "train")
    check_config(config, info)
    return splits, info


def selection_split(splits: list[str]) -> str | None:
    """The split that picks best.pt: `val`, else the first `*val` split (CCT's cis_val), else none."""
    if "val" in splits:
        return "val"
    return next((s for s in splits if s.endswith("val")), None)


def make_model(config: TrainConfig, num_classes: int, env: DistEnv):
    """The model, and the module to call in training (DDP-wrapped when distributed)."""
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config.arch, num_classes).to(env.device)
    if env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if not env.distributed:
        return model, model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=device_ids)


def make_optimizer(model, config: TrainConfig, total_steps: int):
    """SGD with momentum 0.9 and a per-step cosine decay from --lr to 0."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def save_epoch(out: Path, record: dict, state: dict, is_best: bool) -> None:
    save_checkpoint(out / "checkpoints" / "last.pt", state)
    if is_best:
        shutil.copyfile(out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt")
    with open(out / "metrics.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    tqdm.write(epoch_line(record))


def train_one_epoch(model, objective, loader, optimizer, scheduler, env: DistEnv, epoch: int, epochs: int) -> dict:
    model.train()
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=env.device)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not env.is_main, leave=False)
    for step, batch in enumerate(bar):
        batch = batch.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
            terms, logits = objective(model, batch)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Running sums stay on the device: reading a value each step would stall a GPU.
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        correct += (logits.argmax(dim=1) == batch.labels).sum()
        seen += len(batch)
        if env.is_main and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    steps = max(1, len(loader))
    seconds = time.perf_counter() - start
    terms_mean = {k: float(v) / steps for k, v in sums.items()}
    return {
        "loss": sum(terms_mean.values()),
        "terms": terms_mean,
        "train_accuracy": float(correct) / max(1, seen),
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": seen * env.world_size / seconds,
        "seconds": seconds,
    }


def check_config(config: TrainConfig, info: dict) -> None:
    if config.cf_online and config.cf != "none" and config.cf not in ONLINE_FILLS:
        raise UserError(
            f"--cf {config.cf} is offline only: drop --cf-online and read it from shards made with "
            f"`cfrobust preprocess --cf {config.cf}` (online fills: {', '.join(ONLINE_FILLS)})"
        )
    if config.cf != "none" and not config.cf_online and config.cf not in info["cf_methods"]:
        have = ", ".join(info["cf_methods"]) or "none"
        raise UserError(
            f"{config.shards}/train: the shards carry no {config.cf!r} counterfactual (they have: {have}); "
            f"re-run `cfrobust preprocess --cf {config.cf}`"
        )
    if config.epochs < 1 or config.batch < 1:
        raise UserError("--epochs and --batch must be at least 1")


def prepare_run_folder(out: Path, config: TrainConfig) -> None:
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise UserError(f"{out} already holds a run; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))


def checkpoint_state(model, optimizer, scheduler, config, info, epoch: int, step: int) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "classes": list(info["classes"]),
        "rng": {"torch": torch.get_rng_state()},
    }


def epoch_line(record: dict) -> str:
    terms = " ".join(f"{k}={v:.3f}" for k, v in record["terms"].items())
    line = f"epoch {record['epoch']}: loss {record['loss']:.3f} ({terms}) train acc {record['train_accuracy']:.3f}"
    if "val" in record:
        line += f" | val acc {record['val']['accuracy']:.3f} worst group {record['val']['worst_group_accuracy']:.3f}"
    return line + f" | {record['images_per_s']:.0f} img/s"
