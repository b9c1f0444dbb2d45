"""The headline figures of a dataset, derived from the per-split results of an evaluation.

They are computed from the data, not from the dataset's name: whatever the shards carry
decides what appears (DESIGN §6).
- `weighted_mean_accuracy`: test group accuracies weighted by the groups' shares of the
  training split (Sagawa et al.'s Waterbirds "average accuracy").
- `orig_accuracy` / `flip_accuracy` (the official code's names): accuracy on the test groups
  whose background agrees / disagrees with the label, for sources that name the agreeing
  ("aligned") groups in their manifest.
- `bg_gap` = accuracy(mixed_same) - accuracy(mixed_rand) (ImageNet-9 Backgrounds Challenge).
- `cis_trans_gap` = accuracy(cis_test) - accuracy(trans_test) (camera traps: seen vs unseen places).
"""

from __future__ import annotations


def derived_figures(splits: dict, train_info: dict | None) -> dict:
    figures: dict = {}
    headline = "test" if "test" in splits else None
    if headline and splits[headline].get("n") and train_info:
        test = splits[headline]
        weighted = weighted_mean_accuracy(test["groups"], train_info.get("group_counts", {}))
        if weighted is not None:
            figures["weighted_mean_accuracy"] = weighted
        aligned = train_info.get("aligned_groups") or []
        if aligned:
            figures["orig_accuracy"] = pooled_accuracy(test["groups"], set(aligned), inside=True)
            figures["flip_accuracy"] = pooled_accuracy(test["groups"], set(aligned), inside=False)
    figures.update(gap(splits, "mixed_same", "mixed_rand", "bg_gap"))
    figures.update(gap(splits, "cis_test", "trans_test", "cis_trans_gap"))
    return figures


def weighted_mean_accuracy(test_groups: dict, train_counts: dict) -> float | None:
    """Sum over groups of accuracy x training share; None unless every test group was in training."""
    if not train_counts or not set(test_groups) <= set(train_counts):
        return None
    total = sum(train_counts[g] for g in test_groups)
    return sum(test_groups[g]["accuracy"] * train_counts[g] / total for g in test_groups) if total else None


def pooled_accuracy(groups: dict, chosen: set, inside: bool) -> float | None:
    """Accuracy over all samples of the groups in (or outside) `chosen`, weighted by group size."""
    members = {g: v for g, v in groups.items() if (g in chosen) == inside}
    n = sum(v["n"] for v in members.values())
    return sum(v["accuracy"] * v["n"] for v in members.values()) / n if n else None


def gap(splits: dict, first: str, second: str, name: str) -> dict:
    if splits.get(first, {}).get("n") and splits.get(second, {}).get("n"):
        return {name: splits[first]["accuracy"] - splits[second]["accuracy"]}
    return {}
