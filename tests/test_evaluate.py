"""`cfrobust eval` end to end on tiny shards (OOD, saliency focus, gathering) and the derived
headline figures. The metric functions themselves are tested in test_metrics.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfrobust.trainer.derived import derived_figures, weighted_mean_accuracy


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


# --- `cfrobust eval` end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained simple-cnn on the tiny shards' two classes, saved as `cfrobust train` does."""
    import torch

    from cfrobust.trainer.checkpoint import save_checkpoint
    from cfrobust.trainer.config import TrainConfig
    from cfrobust.trainer.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    model = build_model("simple-cnn", 2)
    save_checkpoint(path, {"model": model.state_dict(), "config": TrainConfig(arch="simple-cnn").to_dict(), "classes": ["disk", "ring"]})
    return path


def run_eval(tiny_shards, checkpoint, out, *options):
    from click.testing import CliRunner

    from cfrobust.cli.main import cli

    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--shards", str(tiny_shards), "--out", str(out), *options])
    return result


def samples_with_boxes(split_dir) -> int:
    from cfrobust.shards.reader import EvalShards

    return sum(int(b.box_valid.any(dim=1).sum()) for b in EvalShards(split_dir, 16).iter_worker(0, 1))


def test_eval_cli_scores_noise_images_and_saliency_focus(tiny_shards, checkpoint, tmp_path):
    import json

    import torch

    from cfrobust.distributed import DistEnv
    from cfrobust.trainer.checkpoint import load_checkpoint
    from cfrobust.trainer.evaluate import model_outputs, predict
    from cfrobust.trainer.metrics import anomaly_scores, ood_detection
    from cfrobust.trainer.models import build_model
    from cfrobust.trainer.ood import noise_scores

    out = tmp_path / "eval.json"
    result = run_eval(tiny_shards, checkpoint, out, "--splits", "val,test", "--ood", "gaussian,uniform", "--ood-samples", "40", "--saliency-focus", "--batch", "32")
    assert result.exit_code == 0, result.output
    assert "gaussian: FPR@95TPR" in result.output and "saliency-focus" in result.output
    document = json.loads(out.read_text())
    assert document["dataset"] == "synthetic" and document["ood_seed"] == 0
    assert list(document["splits"]) == ["val", "test"]

    model = build_model("simple-cnn", 2)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    assert all(document["splits"][s]["ood"]["uniform"]["n"] == 40 for s in ("val", "test"))
    for split in ("test",):
        figures = document["splits"][split]
        assert figures["n"] == 32 and 0 <= figures["aupr"] <= 1
        # Recomputed apart, with another batch size: the same focus and OOD figures.
        pred = predict(model, tiny_shards / split, env, batch_size=12, num_classes=2, focus=True)
        assert figures["saliency_focus"] == pytest.approx(float(np.nanmean(pred["focus"])), rel=1e-5)
        assert figures["saliency_focus_n"] == samples_with_boxes(tiny_shards / split) > 0
        assert 0 < figures["saliency_focus"] < 1
        for kind in ("gaussian", "uniform"):
            noise = noise_scores(lambda x: anomaly_scores(model_outputs(model, x, env).detach().numpy(), 2), kind, 40, 32, 0, env)
            expected = ood_detection(pred["anomaly"], noise)
            assert figures["ood"][kind]["n"] == 40
            for name in ("fpr_at_95_tpr", "auroc", "aupr"):
                assert figures["ood"][kind][name] == pytest.approx(expected[name], abs=1e-6)


def test_eval_takes_as_many_noise_images_as_the_split_by_default(tiny_shards, checkpoint, tmp_path):
    import json

    out = tmp_path / "eval.json"
    result = run_eval(tiny_shards, checkpoint, out, "--splits", "test", "--ood", "uniform")
    assert result.exit_code == 0, result.output
    test = json.loads(out.read_text())["splits"]["test"]
    assert test["ood"]["uniform"]["n"] == test["n"] == 32
    assert "saliency_focus" not in test and "gaussian" not in test["ood"]


def test_an_unknown_noise_kind_is_a_one_line_error(tiny_shards, checkpoint, tmp_path):
    result = run_eval(tiny_shards, checkpoint, tmp_path / "e.json", "--ood", "gaussian,pink")
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == "Error: --ood 'pink': unknown noise kind (choose from gaussian, uniform)"
    assert not (tmp_path / "e.json").exists()


def test_two_ranks_gather_the_figures_of_one_process(tiny_shards, checkpoint, monkeypatch):
    """Each rank reads half the shards and half the noise chunks; after gathering, both ranks'
    figures equal a single process's. The two ranks are threads sharing an in-memory all-gather."""
    import copy
    import threading

    import torch

    from cfrobust.distributed import DistEnv
    from cfrobust.trainer import evaluate, ood
    from cfrobust.trainer.checkpoint import load_checkpoint
    from cfrobust.trainer.models import build_model

    model = build_model("simple-cnn", 2)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])

    def figures(rank, world_size):
        env = DistEnv(rank, world_size, rank, torch.device("cpu"))
        options = dict(ood=["gaussian"], ood_samples=70, saliency_focus=True)
        return evaluate.evaluate_splits(copy.deepcopy(model), tiny_shards, ["val"], env, 8, 0, 2, **options)

    alone = figures(0, 1)
    slots, sizes, barrier = [None, None], [], threading.Barrier(2, timeout=60)

    def all_gather(obj, env):
        slots[env.rank] = obj
        barrier.wait()
        gathered = list(slots)
        sizes.append(len(obj["keys"]) if isinstance(obj, dict) and "keys" in obj else None)
        barrier.wait()  # nobody refills a slot before both have read
        return gathered

    for module in (evaluate, ood):
        monkeypatch.setattr(module, "gather_objects", all_gather)
    results, errors = {}, []

    def rank_main(rank):
        try:
            results[rank] = figures(rank, 2)
        except Exception as exc:  # surfaced below; a dead thread would leave the other waiting
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert 16 in sizes  # each rank read one of the split's two 16-sample shards
    for rank in (0, 1):
        for split in ("val",):
            a, b = alone[split], results[rank][split]
            assert a["groups"] == b["groups"] and a["saliency_focus_n"] == b["saliency_focus_n"]
            for name in ("n", "accuracy", "loss", "ece", "auroc", "aupr", "saliency_focus"):
                assert b[name] == pytest.approx(a[name], rel=1e-6), name
            assert b["ood"]["gaussian"] == pytest.approx(a["ood"]["gaussian"])


def test_a_derived_figure_a_split_cannot_give_prints_as_a_dash(checkpoint, tmp_path):
    import json

    from cfrobust.datasets import open_dataset
    from cfrobust.preprocess.pipeline import preprocess

    shards = tmp_path / "shards"  # one test image: one of the synthetic dataset's groups is missing
    preprocess(open_dataset("synthetic", seed=3, sizes=(16, 4, 1), image_size=32), shards, [], progress=False)
    result = run_eval(shards, checkpoint, tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    derived = json.loads((tmp_path / "e.json").read_text())["derived"]
    missing = [name for name, value in derived.items() if value is None]
    assert missing and all(f"\n{name}: -\n" in result.output for name in missing)
