"""Every evaluation figure against a hand computation (trainer/metrics.py, focus.py, ood.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfrobust.distributed import DistEnv
from cfrobust.trainer import ood
from cfrobust.trainer.focus import batch_saliency_focus
from cfrobust.trainer.metrics import (
    anomaly_scores,
    aupr,
    auroc,
    average_precision,
    binary_auroc,
    expected_calibration_error,
    fpr_at_tpr,
    mean_of_finite,
    ood_detection,
    split_metrics,
)


def test_binary_auroc_counts_ties_as_half():
    scores = np.array([0.9, 0.4, 0.4, 0.1])
    positive = np.array([True, True, False, False])
    # Pairs (pos, neg): (0.9,0.4)=1, (0.9,0.1)=1, (0.4,0.4)=0.5, (0.4,0.1)=1 -> 3.5 / 4
    assert binary_auroc(scores, positive) == pytest.approx(0.875)
    assert binary_auroc(scores, np.array([True] * 4)) is None
    assert binary_auroc(scores, np.array([False] * 4)) is None


def test_average_precision_by_hand():
    # Descending: + (P 1, R 1/2), - , + (P 2/3, R 1), -  ->  1/2 * 1 + 1/2 * 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.9, 0.8]), np.array([0, 0])) is None
    assert average_precision(np.array([0.3, 0.2]), np.array([1, 1])) == 1.0


def test_average_precision_takes_tied_scores_together():
    # Descending: 0.9 (-), then 0.5 (-, +) at once: P 1/3, R 1/2; then 0.1 (+): P 2/4, R 1.
    scores = np.array([0.5, 0.5, 0.9, 0.1])
    positive = np.array([False, True, False, True])
    assert average_precision(scores, positive) == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))


def test_multiclass_auroc_and_aupr_skip_a_class_absent_from_the_split():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 1, 0])  # class 2 absent: no positives, skipped
    # Class 0: both positives (0.8, 0.6) above both negatives (0.3, 0.2): AUROC 1, AP 1.
    # Class 1: positives 0.7, 0.3; negatives 0.1, 0.3 -> AUROC (1 + 1 + 1 + 0.5) / 4 = 0.875;
    #          AP: 0.7 (+) P 1 R 1/2, then 0.3 (+, -) together P 2/3 R 1 -> 1/2 + 1/3.
    assert auroc(probs, labels) == pytest.approx((1 + 0.875) / 2)
    assert aupr(probs, labels) == pytest.approx((1 + 5 / 6) / 2)


def test_binary_aupr_takes_class_one_as_positive_and_is_null_without_it():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]])
    # Class 1 scores 0.1 (+), 0.6 (-), 0.7 (+): 0.7 + P 1 R 1/2; 0.6 - ; 0.1 + P 2/3 R 1.
    assert aupr(probs, np.array([1, 0, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert aupr(probs, np.array([0, 0, 0])) is None
    assert auroc(probs, np.array([0, 0, 0])) is None
    assert aupr(probs, np.array([1, 1, 1])) == 1.0  # defined: every positive is found at once


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    # Bin (0.9, 1.0]: 2 samples, confidence 0.95, accuracy 0.5; bin (0.6, 0.7]: 1 sample, conf 0.65,
    # acc 1; bin (0.5, 0.6]: 1 sample, conf 0.55, acc 0.
    expected = 0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.55
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_split_metrics_groups_ties_and_a_group_of_one():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]))
    labels = np.array([0, 1, 1, 1, 0])
    groups = ["a", "a", "b", "b", "c"]
    m = split_metrics(logits, labels, groups)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(4 / 5)  # the tie (0.5, 0.5) predicts class 0
    assert m["groups"] == {"a": {"n": 2, "accuracy": 1.0}, "b": {"n": 2, "accuracy": 0.5}, "c": {"n": 1, "accuracy": 1.0}}
    assert m["worst_group_accuracy"] == 0.5
    assert m["mean_group_accuracy"] == pytest.approx(2.5 / 3)
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7, 0.5])), rel=1e-6)
    # p1 = 0.1 (-), 0.8 (+), 0.4 (+), 0.7 (+), 0.5 (-): positives above negatives in 5 of 6 pairs.
    assert m["auroc"] == pytest.approx(5 / 6)
    # Descending: 0.8 + (P 1), 0.7 + (P 1), 0.5 -, 0.4 + (P 3/4), 0.1 -  ->  (1 + 1 + 3/4) / 3
    assert m["aupr"] == pytest.approx(2.75 / 3)
    assert set(m) == {"n", "accuracy", "loss", "ece", "auroc", "aupr", "groups", "worst_group_accuracy", "mean_group_accuracy"}


def test_all_correct_and_all_wrong():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]])
    right = split_metrics(logits, np.array([0, 1]), ["g", "g"])
    wrong = split_metrics(logits, np.array([1, 0]), ["g", "h"])
    assert (right["accuracy"], right["worst_group_accuracy"], right["auroc"], right["aupr"]) == (1.0, 1.0, 1.0, 1.0)
    # All wrong: the one positive ranks last of two -> AP = P at R 1 = 1/2.
    assert (wrong["accuracy"], wrong["worst_group_accuracy"], wrong["auroc"], wrong["aupr"]) == (0.0, 0.0, 0.0, 0.5)
    confidence = np.exp(2) / (1 + np.exp(2))
    assert right["ece"] == pytest.approx(1 - confidence) and wrong["ece"] == pytest.approx(confidence)


def test_fpr_at_95_tpr_on_a_hand_made_score_list():
    in_scores = np.arange(1, 21) / 100  # 0.01 ... 0.20: the 19th smallest, 0.19, keeps 95% of them
    ood_scores = np.array([0.05, 0.19, 0.195, 0.5])
    assert fpr_at_tpr(in_scores, ood_scores) == 0.5  # 0.05 and 0.19 (a tie passes) get through
    # 10 in-distribution scores: 95% needs all 10, so the threshold is the largest.
    assert fpr_at_tpr(np.arange(10.0), np.array([9.0, 9.5])) == 0.5
    assert fpr_at_tpr(np.zeros(0), ood_scores) is None


def test_ood_detection_takes_the_noise_as_positive():
    in_scores = np.array([0.1, 0.2, 0.3, 0.6])
    ood_scores = np.array([0.5, 0.9])
    figures = ood_detection(in_scores, ood_scores)
    # Pairs (ood, in): 0.9 beats all 4, 0.5 beats 3 -> 7 / 8. AP: 0.9 + (P 1), 0.6 -, 0.5 + (P 2/3).
    assert figures == {
        "n": 2,
        "auroc": pytest.approx(7 / 8),
        "aupr": pytest.approx(0.5 + 0.5 * 2 / 3),
        "fpr_at_95_tpr": 0.5,  # 95% of 4 needs all 4: threshold 0.6, which 0.5 passes and 0.9 not
    }


def test_anomaly_score_is_one_minus_max_softmax_or_the_background_mass():
    outputs = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    assert anomaly_scores(outputs, 3) == pytest.approx([0.3, 0.5])
    # channels: 2 classes + 2 background outputs; the background mass is the score.
    channels = np.log(np.array([[0.4, 0.1, 0.3, 0.2]]))
    assert anomaly_scores(channels, 2) == pytest.approx([0.5])


def test_mean_of_finite_skips_nan():
    assert mean_of_finite(np.array([0.2, np.nan, 0.4])) == (pytest.approx(0.3), 2)
    assert mean_of_finite(np.array([np.nan])) == (None, 0)


class PixelWeights(torch.nn.Module):
    """logit_k = sum of weight_k * x over pixels and channels: d logit_k / d x = weight_k."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = torch.nn.Parameter(weights)  # [K, 3, H, W]

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weights)


def test_saliency_focus_of_a_linear_model_is_the_squared_weight_mass_inside_the_box():
    weights = torch.zeros(3, 3, 4, 4)
    weights[0] = 1.0  # uniform: focus = box area / image area
    weights[1] = 1.0
    weights[1, :, 1:3, 1:3] = 2.0  # squared mass inside 4 px x 3 ch x 4 = 48, outside 12 x 3 x 1 = 36
    model = PixelWeights(weights).eval()  # class 2 has zero weights: no gradient, no focus
    images = torch.randn(5, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    boxes = torch.tensor([[[1.0, 1.0, 3.0, 3.0]]] * 5)  # rows 1-2, columns 1-2
    valid = torch.tensor([[True], [True], [True], [True], [False]])  # the last sample has no box
    focus = batch_saliency_focus(model, images, labels, boxes, valid)
    assert focus[:2] == pytest.approx([4 / 16, 48 / 84])
    assert np.isnan(focus[2]) and np.isnan(focus[4])
    assert focus[3] == pytest.approx(48 / 84)  # the same for any image: the model is linear
    # A fractional box covers every pixel it touches (the training masks' rule).
    focus = batch_saliency_focus(model, images[:1], labels[:1], torch.tensor([[[0.5, 0.5, 1.5, 1.5]]]), valid[:1])
    assert focus == pytest.approx([4 / 16])


def test_noise_images_are_seeded_chunked_and_follow_their_distribution():
    first = ood.noise_images("gaussian", 7, 0, 64, 32)
    assert first.shape == (64, 3, 32, 32) and first.dtype == np.uint8
    assert np.array_equal(first, ood.noise_images("gaussian", 7, 0, 64, 32))
    assert not np.array_equal(first, ood.noise_images("gaussian", 8, 0, 64, 32))
    # N(0.5, 1) clipped to [0, 1]: P(x < 0) = P(x > 1) = Phi(-0.5) = 0.3085.
    assert (first == 0).mean() == pytest.approx(0.3085, abs=0.01)
    assert (first == 255).mean() == pytest.approx(0.3085, abs=0.01)
    uniform = ood.noise_images("uniform", 7, 0, 64, 32)
    assert uniform.mean() == pytest.approx(127.5, abs=1.0) and uniform.min() == 0 and uniform.max() == 255


def test_noise_scores_are_the_same_images_for_any_count_and_any_number_of_ranks(monkeypatch):
    def score(images):  # a stand-in model: the mean pixel of each image
        return images.float().mean(dim=(1, 2, 3)).numpy()

    one = DistEnv(0, 1, 0, torch.device("cpu"))
    alone = ood.noise_scores(score, "uniform", 150, 8, 3, one)
    assert alone.shape == (150,)
    assert np.array_equal(ood.noise_scores(score, "uniform", 70, 8, 3, one), alone[:70])
    # Two ranks: each scores every other chunk; the gathered result is the one-process result.
    parts = {}

    def keep_own(obj, env):
        parts[env.rank] = obj
        return [obj]

    monkeypatch.setattr(ood, "gather_objects", keep_own)
    for rank in (0, 1):
        with pytest.raises(KeyError):  # alone, a rank misses the other's chunks
            ood.noise_scores(score, "uniform", 150, 8, 3, DistEnv(rank, 2, rank, torch.device("cpu")))
    assert sorted(parts[0]) == [0, 2] and sorted(parts[1]) == [1]
    monkeypatch.setattr(ood, "gather_objects", lambda obj, env: [parts[0], parts[1]])
    assert np.array_equal(ood.noise_scores(score, "uniform", 150, 8, 3, DistEnv(0, 2, 0, torch.device("cpu"))), alone)
