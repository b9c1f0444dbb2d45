"""Score a model on shard splits and write `eval.json` (schema cfrobust.eval/1, DESIGN §6).

Each split is read exactly once across all ranks and loader workers; per-sample results are
gathered so every rank computes the same figures (rank 0 writes them). The figures themselves
are pure functions in metrics.py; OOD noise images come from ood.py, saliency focus from focus.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfrobust.distributed import DistEnv, gather_objects, setup_distributed, teardown_distributed
from cfrobust.errors import UserError
from cfrobust.outputs import check_output_file
from cfrobust.shards.manifest import list_splits, read_info
from cfrobust.shards.reader import EvalShards, make_loader
from cfrobust.shards.remote import is_url, location
from cfrobust.shards.schema import INFO_NAME
from cfrobust.trainer.checkpoint import load_classifier
from cfrobust.trainer.derived import derived_figures
from cfrobust.trainer.focus import batch_saliency_focus
from cfrobust.trainer.metrics import anomaly_scores, mean_of_finite, ood_detection, split_metrics
from cfrobust.trainer.models import on_device
from cfrobust.trainer.ood import check_noise_kinds, noise_scores
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.pixels import normalize, using_normalization

EVAL_SCHEMA = "cfrobust.eval/1"
PER_SAMPLE = ("logits", "anomaly", "labels", "focus")  # arrays predict() gathers, besides groups and keys


def model_outputs(model, images: torch.Tensor, env: DistEnv, image_size: int | None = None) -> torch.Tensor:
    """All outputs of the model on a uint8 batch, normalised on the device and resized to
    `image_size` (None: as stored). In float32 whatever the training precision: bf16 logits
    (8 significant bits) would tie in the rankings behind AUROC, AUPR and the OOD figures."""
    return model(model_inputs(images.to(env.device), image_size)).float()


def model_inputs(images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """uint8 images as the model sees them at evaluation: normalised, then resized (bilinear,
    antialiased, as a PIL resize) when `image_size` differs from their side."""
    x = normalize(images)
    if image_size and tuple(x.shape[2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def predict(model, split_dir, env: DistEnv, batch_size: int = 256, workers: int = 0, num_classes=None, focus: bool = False,
            image_size: int | None = None) -> dict:
    """Per-sample logits, anomaly scores (metrics.anomaly_scores), labels, groups, keys and, with
    `focus`, saliency focus (NaN where undefined) of a split, gathered from all ranks. Only the
    first `num_classes` outputs are logits (the `channels` CF loss adds K background outputs)."""
    was_training = model.training
    model.eval()
    part: dict = {name: [] for name in PER_SAMPLE + ("groups", "keys")}
    try:
        for batch in make_loader(EvalShards(split_dir, batch_size, env.rank, env.world_size), workers):
            part["labels"].append(batch.labels.numpy())
            batch = batch.to(env.device)
            outputs = model_outputs(model, batch.images, env, image_size).cpu().numpy()
            part["logits"].append(outputs[:, :num_classes])
            part["anomaly"].append(anomaly_scores(outputs, num_classes or outputs.shape[1]))
            if focus:
                images = model_inputs(batch.images, image_size)
                boxes = batch.boxes * (images.shape[-1] / batch.images.shape[-1])  # to the resized pixels
                part["focus"].append(batch_saliency_focus(model, images, batch.labels, boxes, batch.box_valid))
            part["groups"] += batch.groups
            part["keys"] += batch.keys
    finally:
        model.train(was_training)
    mine = {name: np.concatenate(part[name]) if part[name] else None for name in PER_SAMPLE}
    mine.update(groups=part["groups"], keys=part["keys"])
    return merge_parts([p for p in gather_objects(mine, env) if p["keys"]])


def merge_parts(parts: list[dict]) -> dict:
    """One prediction from the ranks' parts (in rank order); empty arrays when no rank read a sample."""
    merged = {
        name: np.concatenate([p[name] for p in parts]) if parts and parts[0][name] is not None else np.zeros(0)
        for name in PER_SAMPLE
    }
    if not parts:
        merged["labels"] = np.zeros(0, np.int64)
    merged["groups"] = [g for p in parts for g in p["groups"]]
    merged["keys"] = [k for p in parts for k in p["keys"]]
    return merged


def evaluate_splits(
    model, shards_root, splits, env: DistEnv, batch_size: int = 256, workers: int = 0, num_classes=None,
    *, ood=(), ood_samples: int | None = None, ood_seed: int = 0, saliency_focus: bool = False,
    image_size: int | None = None,
) -> dict:
    """{split: figures} for each split, images resized to `image_size` (None: as stored). `ood`: noise kinds (ood.NOISE_KINDS) to score against
    every split as in-distribution, `ood_samples` images each (default: as many as the split);
    `saliency_focus`: add the mean saliency focus of the split's samples with boxes."""
    kinds = check_noise_kinds(list(ood))
    predictions = {s: predict(model, location(shards_root) / s, env, batch_size, workers, num_classes, saliency_focus, image_size)
                   for s in splits}
    results = {}
    for split, pred in predictions.items():
        if len(pred["labels"]) == 0:
            results[split] = {"n": 0}
            continue
        results[split] = split_metrics(pred["logits"], pred["labels"], pred["groups"])
        if saliency_focus:
            focus, counted = mean_of_finite(pred["focus"])
            results[split].update(saliency_focus=focus, saliency_focus_n=counted)
    if kinds:
        add_ood_figures(results, predictions, model, shards_root, env, num_classes, kinds, ood_samples, ood_seed, image_size)
    return results


def add_ood_figures(results, predictions, model, shards_root, env, num_classes, kinds, ood_samples, ood_seed,
                    image_size=None) -> None:
    """results[split]["ood"][kind] = ood_detection(split's anomaly scores, noise scores).

    Each kind's noise is scored once per image size, as many images as the largest split needs;
    a split uses the first n of them (the same images whatever the split)."""
    need: dict[int, int] = {}  # image size -> noise images needed
    for split, pred in predictions.items():
        if len(pred["labels"]):
            size = read_info(location(shards_root) / split)["size"]
            need[size] = max(need.get(size, 0), ood_samples or len(pred["labels"]))

    def score(images: torch.Tensor) -> np.ndarray:
        outputs = model_outputs(model, images, env, image_size)
        return anomaly_scores(outputs.cpu().numpy(), num_classes or outputs.shape[1])

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            noise = {(k, s): noise_scores(score, k, n, s, ood_seed, env) for k in kinds for s, n in need.items()}
    finally:
        model.train(was_training)
    for split, pred in predictions.items():
        if len(pred["labels"]):
            size, count = read_info(location(shards_root) / split)["size"], ood_samples or len(pred["labels"])
            results[split]["ood"] = {k: ood_detection(pred["anomaly"], noise[k, size][:count]) for k in kinds}


def evaluate_checkpoint(
    checkpoint, shards, splits, out, batch_size=256, device="auto", workers=0,
    *, ood=(), ood_samples=None, ood_seed=0, saliency_focus=False, cache_dir=None,
) -> dict:
    """`cfrobust eval`: score a saved checkpoint on shard splits and write the eval JSON.
    `shards` is a folder or a URL (remote shards are kept in `cache_dir` when given)."""
    check_noise_kinds(list(ood))  # before any work
    shards = location(shards, cache_dir) if is_url(shards) else shards
    check_eval_output(Path(out), Path(checkpoint), location(shards))
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch {batch_size} / --workers {workers}: need a batch of at least 1 and 0 or more workers")
    if ood_samples is not None and ood_samples < 1:
        raise UserError(f"--ood-samples must be at least 1, got {ood_samples}")
    env = setup_distributed(device)
    try:
        model, config, classes = load_classifier(checkpoint)
        run = TrainConfig.from_dict(config)
        available = list_splits(shards)
        splits = splits or [s for s in available if s != "train"]
        if not splits:
            raise UserError(f"{shards}: no split to score besides train; pass --splits train to score that one")
        missing = [s for s in splits if s not in available]
        if missing:
            raise UserError(f"{shards}: no split {missing[0]!r} (found: {', '.join(available)})")
        check_classes(checkpoint, classes, shards, splits)
        num_classes = len(classes)
        on_device(model, env.device)
        with using_normalization(run.normalize):
            results = evaluate_splits(
                model, shards, splits, env, batch_size, workers, num_classes,
                ood=ood, ood_samples=ood_samples, ood_seed=ood_seed, saliency_focus=saliency_focus,
                image_size=run.eval_side(),
            )
        document = eval_document(checkpoint, config, results, shards)
        if ood:
            document["ood_seed"] = ood_seed
        if env.is_main:
            write_json(out, document)
        return document
    finally:
        teardown_distributed()


def check_eval_output(out: Path, checkpoint: Path, shards: Path) -> None:
    """--out may replace an earlier eval JSON, and nothing else: not the checkpoint, nothing
    under --shards, no other file (a manifest, a shard, another checkpoint)."""
    check_output_file(out, [checkpoint])
    if not is_url(shards) and shards.exists() and (out.resolve() == shards.resolve() or shards.resolve() in out.resolve().parents):
        raise UserError(f"--out {out} lies inside --shards {shards}; write the eval JSON elsewhere")
    if out.is_file() and not is_eval_document(out):
        raise UserError(f"--out {out} exists and is not an eval JSON; --out replaces only an earlier one: choose another")


def is_eval_document(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == EVAL_SCHEMA
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_classes(checkpoint, classes: list[str], shards, splits: list[str]) -> None:
    """The model's classes are the shards' (the same names in the same order): logit k is class k."""
    for split in splits:
        found = read_info(location(shards) / split)["classes"]
        if list(found) != list(classes):
            raise UserError(f"{checkpoint}: trained on classes {list(classes)}, but {location(shards) / split} has {list(found)}")


def eval_document(checkpoint, config: dict, splits: dict, shards_root) -> dict:
    """The eval JSON: per-split figures plus the dataset's headline figures (see derived.py).
    `dataset` names the source the shards were made from (their manifest), when known."""
    train_dir = location(shards_root) / "train"
    train_info = read_info(train_dir) if (train_dir / INFO_NAME).is_file() else None
    document = {
        "schema": EVAL_SCHEMA,
        "checkpoint": str(checkpoint),
        "config": config,
        "splits": splits,
        "derived": derived_figures(splits, train_info),
    }
    dataset = ((train_info or {}).get("source") or {}).get("dataset")
    if dataset:
        document["dataset"] = dataset
    return document


def write_json(path: Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
