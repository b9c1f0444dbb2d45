"""Evaluation figures against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfrobust.trainer.derived import derived_figures, weighted_mean_accuracy
from cfrobust.trainer.evaluate import auroc, binary_auroc, expected_calibration_error, split_metrics


def test_binary_auroc_counts_ties_as_half():
    scores = np.array([0.9, 0.4, 0.4, 0.1])
    positive = np.array([True, True, False, False])
    # Pairs (pos, neg): (0.9,0.4)=1, (0.9,0.1)=1, (0.4,0.4)=0.5, (0.4,0.1)=1 -> 3.5 / 4
    assert binary_auroc(scores, positive) == pytest.approx(0.875)
    assert binary_auroc(scores, np.array([True] * 4)) is None


def test_multiclass_auroc_is_the_mean_over_classes_present():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 1, 0])  # class 2 absent: no positives, skipped
    expected = (binary_auroc(probs[:, 0], labels == 0) + binary_auroc(probs[:, 1], labels == 1)) / 2
    assert auroc(probs, labels) == pytest.approx(expected)
    assert binary_auroc(probs[:, 0], labels == 0) == 1.0


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # Bin (0.9, 1.0]: 2 samples, confidence 0.95, accuracy 0.5; bin (0.6, 0.7]: 1 sample, conf 0.65,
    # acc 1; bin (0.5, 0.6]: 1 sample, conf 0.55, acc 0.
    expected = 0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.55
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_split_metrics_groups_and_worst_group():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]))
    labels = np.array([0, 1, 1, 1, 0])
    groups = ["a", "a", "b", "b", "c"]
    m = split_metrics(logits, labels, groups)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(4 / 5)  # the tie (0.5, 0.5) predicts class 0
    assert m["groups"] == {"a": {"n": 2, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}, "c": {"n": 1, "accuracy": 1.0}}
    assert m["worst_group_accuracy"] == 0.5
    assert m["mean_group_accuracy"] == pytest.approx(2.5 / 3)
    expected_loss = -np.mean(np.log([0.9, 0.8, 0.4, 0.7, 0.5]))
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_all_correct_and_all_wrong():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    right = split_metrics(logits, np.array([0, 1]), ["g", "g"])
    wrong = split_metrics(logits, np.array([1, 0]), ["g", "h"])
    assert right["accuracy"] == 1.0 and right["worst_group_accuracy"] == 1.0 and right["auroc"] == 1.0
    assert wrong["accuracy"] == 0.0 and wrong["worst_group_accuracy"] == 0.0 and wrong["auroc"] == 0.0


def _split(groups: dict) -> dict:
    n = sum(v["n"] for v in groups.values())
    return {"n": n, "accuracy": sum(v["n"] * v["accuracy"] for v in groups.values()) / n, "groups": groups}


def test_waterbirds_style_figures():
    test = _split({
        "landbird/land": {"n": 4, "accuracy": 1.0},
        "landbird/water": {"n": 4, "accuracy": 0.5},
        "waterbird/land": {"n": 2, "accuracy": 0.0},
        "waterbird/water": {"n": 2, "accuracy": 1.0},
    })
    train_info = {
        "group_counts": {"landbird/land": 3498, "landbird/water": 184, "waterbird/land": 56, "waterbird/water": 1057},
        "aligned_groups": ["landbird/land", "waterbird/water"],
    }
    figures = derived_figures({"val": test, "test": test}, train_info)
    total = 3498 + 184 + 56 + 1057
    assert figures["weighted_mean_accuracy"] == pytest.approx((3498 * 1.0 + 184 * 0.5 + 1057 * 1.0) / total)
    assert figures["orig_accuracy"] == pytest.approx(6 / 6)  # 4 + 2 aligned samples, all right
    assert figures["flip_accuracy"] == pytest.approx(2 / 6)
    assert set(figures) == {"weighted_mean_accuracy", "orig_accuracy", "flip_accuracy"}


def test_weighted_mean_needs_every_test_group_in_training():
    assert weighted_mean_accuracy({"x": {"n": 1, "accuracy": 1.0}}, {"y": 5}) is None


def test_gaps_need_both_splits():
    splits = {"mixed_same": {"n": 10, "accuracy": 0.9}, "mixed_rand": {"n": 10, "accuracy": 0.75}}
    assert derived_figures(splits, None) == {"bg_gap": pytest.approx(0.15)}
    assert derived_figures({"mixed_same": splits["mixed_same"]}, None) == {}
    cct = {"cis_test": {"n": 3, "accuracy": 0.8}, "trans_test": {"n": 3, "accuracy": 0.5}}
    assert derived_figures(cct, {"group_counts": {}}) == {"cis_trans_gap": pytest.approx(0.3)}
    assert math.isclose(derived_figures(cct, None)["cis_trans_gap"], 0.3)
