"""Tables that compare runs from their eval documents."""

from __future__ import annotations


def summary_markdown(documents: dict[str, dict], split: str = "test") -> str:
    """One row per run: accuracy, worst-group accuracy and each group's accuracy on `split`."""
    groups = sorted({g for doc in documents.values() for g in doc["splits"][split]["groups"]})
    header = ["run", "method", "accuracy", "worst-group"] + groups
    lines = [f"Results on the {split} split (accuracy as a fraction; groups are label/background).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, doc in documents.items():
        figures = doc["splits"][split]
        row = [name, _describe(doc["config"]), f"{figures['accuracy']:.3f}", f"{figures['worst_group_accuracy']:.3f}"]
        row += [f"{figures['groups'][g]['accuracy']:.3f}" if g in figures["groups"] else "-" for g in groups]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _describe(config: dict) -> str:
    from cfrobust.trainer.config import TrainConfig

    return TrainConfig.from_dict(config).describe()
