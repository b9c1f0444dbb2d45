"""Score a model on shard splits and write `eval.json` (schema cfrobust.eval/1, DESIGN §6).

Each split is read exactly once across all ranks and loader workers; predictions are gathered
so every rank computes the same figures (rank 0 writes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cfrobust.errors import UserError
from cfrobust.shards.manifest import list_splits, read_info
from cfrobust.shards.schema import INFO_NAME
from cfrobust.shards.reader import EvalShards, make_loader
from cfrobust.trainer.checkpoint import load_checkpoint
from cfrobust.trainer.counterfactual import output_size
from cfrobust.trainer.derived import derived_figures
from cfrobust.distributed import DistEnv, gather_objects, setup_distributed, teardown_distributed
from cfrobust.trainer.models import build_model
from cfrobust.trainer.pixels import normalize

EVAL_SCHEMA = "cfrobust.eval/1"
ECE_BINS = 10


@torch.no_grad()
def predict(model, split_dir, env: DistEnv, batch_size: int = 256, workers: int = 0, num_classes=None) -> dict:
    """Logits, labels and groups of every sample of a split (gathered from all ranks). Only the
    first `num_classes` outputs count (the `channels` CF loss adds K background outputs)."""
    was_training = model.training
    model.eval()
    logits, labels, groups, keys = [], [], [], []
    for batch in make_loader(EvalShards(split_dir, batch_size, env.rank, env.world_size), workers):
        images = normalize(batch.images.to(env.device))
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.device.type == "cuda"):
            out = model(images)
        logits.append(out[:, :num_classes].float().cpu())
        labels.append(batch.labels)
        groups += batch.groups
        keys += batch.keys
    model.train(was_training)
    part = {
        "logits": torch.cat(logits).numpy() if logits else np.zeros((0, 0), np.float32),
        "labels": torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        "groups": groups,
        "keys": keys,
    }
    parts = [p for p in gather_objects(part, env) if len(p["labels"])]
    if not parts:
        return {"logits": np.zeros((0, 0), np.float32), "labels": np.zeros(0, np.int64), "groups": [], "keys": []}
    return {
        "logits": np.concatenate([p["logits"] for p in parts]),
        "labels": np.concatenate([p["labels"] for p in parts]),
        "groups": [g for p in parts for g in p["groups"]],
        "keys": [k for p in parts for k in p["keys"]],
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - confidence| weighted by bin share."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def binary_auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Average rank within runs of equal scores.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Binary AUROC of class 1 for two classes, else the macro one-vs-rest mean over the
    classes present with both positives and negatives; None when undefined."""
    if probs.shape[1] == 2:
        return binary_auroc(probs[:, 1], labels == 1)
    values = [binary_auroc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def split_metrics(logits: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict:
    probs = softmax(logits)
    correct = probs.argmax(axis=1) == labels
    group_names = sorted(set(groups))
    group_array = np.array(groups)
    per_group = {
        g: {"n": int((group_array == g).sum()), "accuracy": float(correct[group_array == g].mean())}
        for g in group_names
    }
    group_accuracies = [v["accuracy"] for v in per_group.values()]
    return {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()),
        "loss": cross_entropy(logits, labels),
        "ece": expected_calibration_error(probs, labels),
        "auroc": auroc(probs, labels),
        "groups": per_group,
        "worst_group_accuracy": float(min(group_accuracies)),
        "mean_group_accuracy": float(np.mean(group_accuracies)),
    }


def evaluate_splits(model, shards_root, splits, env: DistEnv, batch_size: int = 256, workers: int = 0, num_classes=None):
    results = {}
    for split in splits:
        pred = predict(model, Path(shards_root) / split, env, batch_size, workers, num_classes)
        empty = len(pred["labels"]) == 0
        results[split] = {"n": 0} if empty else split_metrics(pred["logits"], pred["labels"], pred["groups"])
    return results


def evaluate_checkpoint(checkpoint, shards, splits, out, batch_size=256, device="auto", workers=0) -> dict:
    """`cfrobust eval`: score a saved checkpoint on shard splits and write the eval JSON."""
    env = setup_distributed(device)
    try:
        state = load_checkpoint(checkpoint, map_location="cpu")
        available = list_splits(shards)
        splits = splits or [s for s in available if s != "train"]
        missing = [s for s in splits if s not in available]
        if missing:
            raise UserError(f"{shards}: no split {missing[0]!r} (found: {', '.join(available)})")
        num_classes = len(state["classes"])
        outputs = output_size(num_classes, state["config"].get("cf_loss", "logp"))
        model = build_model(state["config"]["arch"], outputs)
        model.load_state_dict(state["model"])
        model.to(env.device)
        results = evaluate_splits(model, shards, splits, env, batch_size, workers, num_classes)
        document = eval_document(checkpoint, state["config"], results, shards)
        if env.is_main:
            write_json(out, document)
        return document
    finally:
        teardown_distributed()


def eval_document(checkpoint, config: dict, splits: dict, shards_root) -> dict:
    """The eval JSON: per-split figures plus the dataset's headline figures (see derived.py)."""
    train_dir = Path(shards_root) / "train"
    train_info = read_info(train_dir) if (train_dir / INFO_NAME).is_file() else None
    return {
        "schema": EVAL_SCHEMA,
        "checkpoint": str(checkpoint),
        "config": config,
        "splits": splits,
        "derived": derived_figures(splits, train_info),
    }


def write_json(path: Path, document: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)
