"""The Python API: `import cfrobust` stays free of torch, every public name resolves to the
trainer's own object, and examples/own_loop.py (README's block) trains a torchvision model."""

from __future__ import annotations

import copy
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import cfrobust
from cfrobust.shards import reader
from cfrobust.trainer import (
    augment, config, counterfactual, evaluate, factual, fills, metrics, models, objective, pixels, saliency,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_loop.py"

# Written out by hand: a rename in the trainer must show up here, not silently change the API.
SURFACE = {
    "TrainShards": reader.TrainShards,
    "EvalShards": reader.EvalShards,
    "Batch": reader.Batch,
    "make_loader": reader.make_loader,
    "TrainConfig": config.TrainConfig,
    "Objective": objective.Objective,
    "Augmentation": augment.Augmentation,
    "build_model": models.build_model,
    "normalize": pixels.normalize,
    "set_normalization": pixels.set_normalization,
    "using_normalization": pixels.using_normalization,
    "box_masks": pixels.box_masks,
    "model_inputs": evaluate.model_inputs,
    "COUNTERFACTUAL_FILLS": fills.ONLINE_FILLS,
    "COUNTERFACTUAL_LOSSES": counterfactual.CF_LOSSES,
    "output_size": counterfactual.output_size,
    "class_logits": counterfactual.class_logits,
    "FACTUAL_MODES": factual.FACTUAL_MODES,
    "SALIENCY_SCORES": saliency.SALIENCY_SCORES,
    "SALIENCY_PENALTIES": saliency.REGULARIZERS,
    "input_gradient": saliency.input_gradient,
    "outside_box_penalty": saliency.outside_box_penalty,
    "outside_share_penalty": saliency.outside_share_penalty,
    "split_metrics": metrics.split_metrics,
    "group_accuracies": metrics.group_accuracies,
    "expected_calibration_error": metrics.expected_calibration_error,
    "auroc": metrics.auroc,
    "aupr": metrics.aupr,
}


def test_import_cfrobust_loads_neither_torch_nor_numpy():
    # TrainConfig and dir() are read without torch too (the CLI and an editor's completion do).
    code = ("import cfrobust, sys; cfrobust.TrainConfig; dir(cfrobust); "
            "print(sorted(m for m in ('torch', 'numpy', 'cv2', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"


def test_every_public_name_is_the_trainers_own_object():
    assert cfrobust.__all__ == list(SURFACE)
    for name, expected in SURFACE.items():
        assert getattr(cfrobust, name) is expected, name
    assert set(cfrobust.__all__) <= set(dir(cfrobust))
    # the registries hold what the CLI offers (its name tuples add "none")
    assert set(cfrobust.COUNTERFACTUAL_FILLS) == {"mean", "random", "shuffle", "tile"}
    assert tuple(cfrobust.COUNTERFACTUAL_LOSSES) == config.CF_LOSSES
    assert ("none",) + tuple(cfrobust.FACTUAL_MODES) == config.FACTUAL_MODES
    assert ("none",) + tuple(cfrobust.SALIENCY_PENALTIES) == config.REGULARIZERS


def test_star_import_gives_exactly_the_public_names():
    namespace: dict = {}
    exec("from cfrobust import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(SURFACE)


def test_unknown_names_fail_and_subpackages_still_import():
    with pytest.raises(AttributeError, match=r"^module 'cfrobust' has no attribute 'Trainer'$"):
        cfrobust.Trainer  # noqa: B018
    from cfrobust import shards, trainer

    assert shards.__name__ == "cfrobust.shards" and trainer.__name__ == "cfrobust.trainer"


def test_own_loop_example_trains_a_torchvision_model(tiny_shards, monkeypatch, capsys):
    made = []

    def recorded_resnet18(**kwargs):
        model = RESNET18(**kwargs)
        made.append((model, copy.deepcopy(model.state_dict())))
        return model

    RESNET18 = torchvision.models.resnet18
    monkeypatch.setattr(torchvision.models, "resnet18", recorded_resnet18)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(tiny_shards), "3"])
    torch.manual_seed(0)
    run = runpy.run_path(str(EXAMPLE), run_name="__main__")

    lines = capsys.readouterr().out.splitlines()
    # 96 training images in 6 shards of 16, 2 workers, batch 32: 2 steps an epoch, so 3 steps span 2 epochs
    assert len(run["data"]) == 2 and run["step"] == 3 and run["data"].epoch == 1
    assert [line.split(":")[0] for line in lines[:3]] == ["step 1", "step 2", "step 3"]
    for line in lines[:3]:
        terms = dict(pair.split("=") for pair in line.split(": ")[1].split())
        assert list(terms) == ["ce", "cf", "sal"]
        assert all(math.isfinite(float(v)) for v in terms.values()) and float(terms["sal"]) > 0
    assert re.fullmatch(r"val accuracy (0|1)\.\d{3}, worst group (0|1)\.\d{3}", lines[3]) and len(lines) == 4
    assert run["figures"]["n"] == 32  # the whole val split, each image once

    (model, initial), = made
    assert model is run["model"]
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert "conv1.weight" in changed and "fc.weight" in changed and "layer4.1.conv2.weight" in changed


def test_readme_shows_the_example_exactly():
    """README's block between `<!-- own-loop:start -->` and `<!-- own-loop:end -->` is this file,
    so the code a reader copies is the code this suite runs."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- own-loop:start -->\n```python\n(.*?)```\n<!-- own-loop:end -->", readme, re.S)
    assert found, "README.md lacks the own-loop block (<!-- own-loop:start --> ```python ... ``` <!-- own-loop:end -->)"
    assert found.group(1) == EXAMPLE.read_text()
