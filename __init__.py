"""cfrobust: classifiers that look at the object, not its background.

Counterfactual and factual data generation with a saliency penalty, after Chang, Adam and
Goldenberg, "Towards Robust Classification Model by Counterfactual and Invariant Data
Generation", CVPR 2021.

The names below are the Python API for your own training loop (timm, Lightning, plain
PyTorch); README's "Your own training loop" shows them at work. They load on first use, so
`import cfrobust` itself stays cheap and does not import torch (the CLI imports the package
before it may set up the OpenMP runtime that torch loads).

    reading shards   TrainShards, EvalShards, Batch, make_loader
    the method       TrainConfig, Objective, Augmentation, build_model
    pixels           normalize, set_normalization, using_normalization, box_masks, model_inputs
    counterfactual   COUNTERFACTUAL_FILLS, COUNTERFACTUAL_LOSSES, output_size, class_logits
    factual          FACTUAL_MODES
    saliency         SALIENCY_SCORES, SALIENCY_PENALTIES, input_gradient,
                     outside_box_penalty, outside_share_penalty
    metrics          split_metrics, group_accuracies, expected_calibration_error, auroc, aupr
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, name there). Registries are the dicts the trainer itself looks up, so
# `COUNTERFACTUAL_FILLS["tile"]` is exactly what `--cf tile --cf-online` runs; treat them as read-only.
_API = {
    "TrainShards": ("cfrobust.shards.reader", "TrainShards"),
    "EvalShards": ("cfrobust.shards.reader", "EvalShards"),
    "Batch": ("cfrobust.shards.reader", "Batch"),
    "make_loader": ("cfrobust.shards.reader", "make_loader"),
    "TrainConfig": ("cfrobust.trainer.config", "TrainConfig"),
    "Objective": ("cfrobust.trainer.objective", "Objective"),
    "Augmentation": ("cfrobust.trainer.augment", "Augmentation"),
    "build_model": ("cfrobust.trainer.models", "build_model"),
    "normalize": ("cfrobust.trainer.pixels", "normalize"),
    "set_normalization": ("cfrobust.trainer.pixels", "set_normalization"),
    "using_normalization": ("cfrobust.trainer.pixels", "using_normalization"),
    "box_masks": ("cfrobust.trainer.pixels", "box_masks"),
    "model_inputs": ("cfrobust.trainer.evaluate", "model_inputs"),
    "COUNTERFACTUAL_FILLS": ("cfrobust.trainer.fills", "ONLINE_FILLS"),
    "COUNTERFACTUAL_LOSSES": ("cfrobust.trainer.counterfactual", "CF_LOSSES"),
    "output_size": ("cfrobust.trainer.counterfactual", "output_size"),
    "class_logits": ("cfrobust.trainer.counterfactual", "class_logits"),
    "FACTUAL_MODES": ("cfrobust.trainer.factual", "FACTUAL_MODES"),
    "SALIENCY_SCORES": ("cfrobust.trainer.saliency", "SALIENCY_SCORES"),
    "SALIENCY_PENALTIES": ("cfrobust.trainer.saliency", "REGULARIZERS"),
    "input_gradient": ("cfrobust.trainer.saliency", "input_gradient"),
    "outside_box_penalty": ("cfrobust.trainer.saliency", "outside_box_penalty"),
    "outside_share_penalty": ("cfrobust.trainer.saliency", "outside_share_penalty"),
    "split_metrics": ("cfrobust.trainer.metrics", "split_metrics"),
    "group_accuracies": ("cfrobust.trainer.metrics", "group_accuracies"),
    "expected_calibration_error": ("cfrobust.trainer.metrics", "expected_calibration_error"),
    "auroc": ("cfrobust.trainer.metrics", "auroc"),
    "aupr": ("cfrobust.trainer.metrics", "aupr"),
}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        # Also how `from cfrobust import shards` learns to import the subpackage instead.
        raise AttributeError(f"module 'cfrobust' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
