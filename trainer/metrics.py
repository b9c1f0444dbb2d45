"""The evaluation figures as pure numpy functions of logits, labels, groups and scores.

Conventions (DESIGN §6): accuracies are fractions; a figure that is undefined for the data at
hand (AUROC of a split holding one class, say) is None, written as null in eval.json.
- AUROC / AUPR: two classes -> class 1 is the positive class, scored by p(class 1); more
  classes -> the macro mean of one-vs-rest values over the classes present in the split (a
  class with no sample in the split is skipped, as the official code drops it).
- AUPR is average precision, AP = sum_n (R_n - R_{n-1}) P_n over the distinct score
  thresholds from the highest down (no interpolation; scikit-learn's `average_precision_score`).
- OOD detection (`ood_detection`): anomaly score = 1 - max softmax probability (for a
  `channels` model, the probability mass of the K background outputs, as the official code);
  AUROC and AUPR take the OOD images as the positive class; FPR at 95% TPR follows the official
  code and Hendrycks & Gimpel: the threshold keeps at least 95% of the in-distribution images
  (TPR), and the FPR is the share of OOD images that also pass it.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 10
KEPT_IN_DISTRIBUTION = 0.95  # the TPR of `fpr_at_95_tpr`


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins (0, 0.1], (0.1, 0.2], ... of |accuracy - confidence|
    weighted by the bin's share of samples (confidence = top-class probability)."""
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
    """Probability that a random positive outscores a random negative (ties count half);
    None without positives or without negatives."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    # Average rank within runs of equal scores, which is what makes a tie count half.
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AP = sum_n (R_n - R_{n-1}) P_n, one term per distinct score from the highest down (tied
    samples enter together); None without positives."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    # The last index of each run of equal scores: the points where a threshold can sit.
    cut = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_pos = np.cumsum(positive)[cut]
    precision = true_pos / (cut + 1)
    recall_gain = np.diff(np.r_[0, true_pos]) / n_pos
    return float((recall_gain * precision).sum())


def one_vs_rest(binary_metric, probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Two classes: the metric of class 1. More: the mean over classes where it is defined."""
    if probs.shape[1] == 2:
        return binary_metric(probs[:, 1], labels == 1)
    values = [binary_metric(probs[:, k], labels == k) for k in range(probs.shape[1])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def auroc(probs: np.ndarray, labels: np.ndarray) -> float | None:
    return one_vs_rest(binary_auroc, probs, labels)


def aupr(probs: np.ndarray, labels: np.ndarray) -> float | None:
    return one_vs_rest(average_precision, probs, labels)


def group_accuracies(correct: np.ndarray, groups: list[str]) -> dict:
    """{group: {"n", "accuracy"}} for every group present, in name order."""
    group_array = np.array(groups)
    return {
        g: {"n": int((group_array == g).sum()), "accuracy": float(correct[group_array == g].mean())}
        for g in sorted(set(groups))
    }


def split_metrics(logits: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict:
    """The per-split figures of eval.json (DESIGN §6). argmax ties go to the lower class."""
    probs = softmax(logits)
    correct = probs.argmax(axis=1) == labels
    per_group = group_accuracies(correct, groups)
    group_values = [v["accuracy"] for v in per_group.values()]
    return {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()),
        "loss": cross_entropy(logits, labels),
        "ece": expected_calibration_error(probs, labels),
        "auroc": auroc(probs, labels),
        "aupr": aupr(probs, labels),
        "groups": per_group,
        "worst_group_accuracy": float(min(group_values)),
        "mean_group_accuracy": float(np.mean(group_values)),
    }


def anomaly_scores(outputs: np.ndarray, num_classes: int) -> np.ndarray:
    """Per sample, how unlike the training data the model finds it: 1 - max softmax over the
    class outputs; for a `channels` model (2K outputs) the softmax mass of the K background
    outputs, as the official code."""
    if outputs.shape[1] > num_classes:
        return softmax(outputs)[:, num_classes:].sum(axis=1)
    return 1.0 - softmax(outputs[:, :num_classes]).max(axis=1)


def fpr_at_tpr(in_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = KEPT_IN_DISTRIBUTION) -> float | None:
    """Share of OOD samples whose score is at most the threshold that keeps `tpr` of the
    in-distribution samples: the ceil(tpr * n)-th smallest in-distribution score."""
    if len(in_scores) == 0 or len(ood_scores) == 0:
        return None
    k = max(1, math.ceil(round(tpr * len(in_scores), 9)))  # round: 0.95 * 20 is 19.000000000000004
    threshold = np.sort(in_scores)[k - 1]
    return float((ood_scores <= threshold).mean())


def ood_detection(in_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
    """FPR at 95% TPR, AUROC and AUPR of telling OOD samples (positive) from in-distribution ones."""
    scores = np.concatenate([ood_scores, in_scores])
    is_ood = np.r_[np.ones(len(ood_scores), bool), np.zeros(len(in_scores), bool)]
    return {
        "n": int(len(ood_scores)),
        "fpr_at_95_tpr": fpr_at_tpr(in_scores, ood_scores),
        "auroc": binary_auroc(scores, is_ood),
        "aupr": average_precision(scores, is_ood),
    }


def mean_of_finite(values: np.ndarray) -> tuple[float | None, int]:
    """(mean, count) of the finite entries; (None, 0) when there are none."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return (float(finite.mean()) if len(finite) else None), int(len(finite))
