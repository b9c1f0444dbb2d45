"""Training end to end on tiny shards: every term combination, the run folder, eval, DDP."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.trainer.checkpoint import load_checkpoint
from cfrobust.trainer.config import CF_FILLS, CF_LOSSES, FACTUAL_MODES, REG_GRADS, REGULARIZERS, TrainConfig
from cfrobust.trainer.models import build_model
from cfrobust.trainer.train import train

EVAL_KEYS = {"n", "accuracy", "loss", "ece", "auroc", "aupr", "groups", "worst_group_accuracy", "mean_group_accuracy"}
# Whole training runs, one option at a time plus the paper's combination; every combination of
# the terms is exercised on single batches in test_objectives_all.py (the DomainBed-style matrix).
RUNS = (
    [dict(cf=c) for c in CF_FILLS]
    + [dict(cf="tile", cf_loss=loss) for loss in CF_LOSSES]
    + [dict(f=f) for f in FACTUAL_MODES[1:]]
    + [dict(reg=r, cf="tile" if r == "gs" else "none") for r in REGULARIZERS[1:]]  # gs compares g with x - x_cf
    + [dict(reg="bbox_o", reg_grad=g) for g in REG_GRADS]
    + [dict(cf="tile", f="mrand", reg="bbox_o")]
    + [dict(reg="bbox_o", reg_impl="finite-diff", reg_every=2)]  # lazy: steps 0 and 2 of 3
)


def tiny_config(shards, out, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), out=str(out), arch="simple-cnn", epochs=1, batch=32, lr=0.05, workers=0, device="cpu")
    return TrainConfig(**{**options, **overrides})


@pytest.mark.parametrize("options", RUNS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_trains_and_writes_a_complete_run(tiny_shards, tmp_path, options):
    config = tiny_config(tiny_shards, tmp_path / "run", reg_coeff=100.0, **options)
    cf, reg = config.cf, config.reg
    document = train(config)
    run = tmp_path / "run"
    # Recorded with the factual pairing that auto took for the two classes of the built-in data.
    assert json.loads((run / "config.json").read_text()) == config.with_factual_pairing(2).to_dict()
    (line,) = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line)
    expected_terms = {"ce"} | ({"cf"} if cf != "none" else set()) | ({"sal"} if reg != "none" else set())
    assert set(record["terms"]) == expected_terms
    assert all(math.isfinite(v) for v in record["terms"].values())
    assert record["step"] == 3  # 96 samples / batch 32, one worker
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    written = json.loads((run / "eval.json").read_text())
    assert written == json.loads(json.dumps(document))
    assert written["schema"] == "cfrobust.eval/1"
    assert set(written["splits"]) == {"val", "test"}
    assert set(written["derived"]) == {"weighted_mean_accuracy", "orig_accuracy", "flip_accuracy"}
    for figures in written["splits"].values():
        assert set(figures) == EVAL_KEYS and figures["n"] == 32
        assert set(figures["groups"]) == {"disk/land", "disk/water", "ring/land", "ring/water"}
        assert all(g["n"] == 8 for g in figures["groups"].values())


def test_saliency_term_is_zero_without_boxes_and_positive_with(tiny_shards, tmp_path):
    document = train(tiny_config(tiny_shards, tmp_path / "run", reg="bbox_o", reg_coeff=1.0))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["terms"]["sal"] > 0
    assert document["best_epoch"] == 1


def test_best_checkpoint_follows_validation_accuracy(tiny_shards, tmp_path):
    train(tiny_config(tiny_shards, tmp_path / "run", epochs=3, select_by="accuracy"))
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    accuracies = [r["val"]["accuracy"] for r in records]
    best_epoch = accuracies.index(max(accuracies)) + 1  # first epoch reaching the maximum
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert best["epoch"] == best_epoch and last["epoch"] == 3
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["best_epoch"] == best_epoch


def test_an_empty_val_split_leaves_the_last_epoch_best(tmp_path):
    dataset = open_dataset("synthetic", seed=1, sizes=(32, 0, 16), image_size=32)
    preprocess(dataset, tmp_path / "shards", ["tile"], shard_size=16, progress=False)
    document = train(tiny_config(tmp_path / "shards", tmp_path / "run", epochs=2, batch=16))
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("val" in r, r["epoch"]) for r in records] == [(False, 1), (False, 2)]
    assert document["best_epoch"] == 2 and document["splits"]["val"] == {"n": 0} and document["splits"]["test"]["n"] == 16


def test_cli_train_then_eval_reproduces_the_run_figures(tiny_shards, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", "--shards", str(tiny_shards), "--out", str(run), "--epochs", "2",  # --arch auto: simple-cnn
            "--batch", "32", "--workers", "1", "--cf", "tile", "--f", "mrand", "--reg", "bbox_o", "--device", "cpu"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"written to {run}/eval.json" in result.output
    assert "note: --arch auto without --pretrained trains simple-cnn from random weights" in result.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and "already holds a run; pass --resume to continue it, --overwrite" in again.output
    out = tmp_path / "eval.json"
    result = runner.invoke(cli, ["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--shards", str(tiny_shards),
                                 "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    evaluated, trained = json.loads(out.read_text()), json.loads((run / "eval.json").read_text())
    assert evaluated["config"] == trained["config"]
    assert trained["config"]["arch"] == "simple-cnn"  # recorded resolved, so eval rebuilt the same net
    for split in ("val", "test"):
        for key in ("n", "accuracy", "worst_group_accuracy", "groups"):
            assert evaluated["splits"][split][key] == trained["splits"][split][key]
        assert evaluated["splits"][split]["loss"] == pytest.approx(trained["splits"][split]["loss"], rel=1e-5)
    only_train = runner.invoke(cli, ["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--shards",
                                     str(tiny_shards), "--out", str(out), "--splits", "train"])
    assert only_train.exit_code == 0 and json.loads(out.read_text())["splits"]["train"]["n"] == 96
    missing = runner.invoke(cli, ["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--shards",
                                  str(tiny_shards), "--out", str(out), "--splits", "holdout"])
    assert missing.exit_code == 1 and "no split 'holdout' (found: train, val, test)" in missing.output


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_models_classify_at_any_size(arch):
    model = build_model(arch, 3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


# The terms that run extra passes through the model besides DDP's forward: the attacks (through
# the unwrapped model, in eval mode) and the captum-style attributions (double backprop).
DDP_TERMS = [
    dict(f="mrand", reg="bbox_o"),
    dict(f="fgsm", reg="bbox_o", reg_grad="grad_cam"),
    dict(f="pgd", f_steps=2, reg="bbox_o", reg_grad="deeplift"),
]


@pytest.mark.parametrize("terms", DDP_TERMS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_torchrun_two_processes_end_with_identical_weights(tiny_shards, tmp_path, terms):
    config = tiny_config(tiny_shards, tmp_path / "run", epochs=2, batch=8, workers=1, cf="tile", **terms)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         json.dumps(config.to_dict()), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["state"].keys() == rank1["state"].keys()
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name
    assert rank0["document"] == rank1["document"]
    # 96 samples over 2 ranks x 1 worker, batch 8: 6 steps per epoch on each rank.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [6, 12]  # rank 0 alone wrote
    assert rank0["document"]["splits"]["test"]["n"] == 32  # eval gathered both ranks' halves


def test_two_processes_and_one_with_the_same_global_batch_reach_the_same_weights(tiny_shards, tmp_path):
    """DDP averages the ranks' gradients; one process accumulating the same two halves
    (--batch-split 2) must take the same optimizer steps, also when the saliency map comes
    from extra passes through the unwrapped model (deeplift, grad_cam), and when only some
    samples keep their boxes (--box-fraction), so that the ranks hold different numbers."""
    worker = Path(__file__).with_name("ddp_equivalence_worker.py")
    runs = [dict(reg_grad="grad_y"), dict(reg_grad="deeplift"), dict(reg_grad="grad_cam"), dict(reg_grad="grad_y", box_fraction=0.3)]
    # The raw penalty: the share divides by each image's gradient energy, which magnifies float
    # rounding between the two reductions past the tolerance for deeplift's near-zero maps.
    # cf_coeff 1: the weights these tolerances were measured with (at 0.5 one weight of 18 differed past them).
    common = dict(shards=str(tiny_shards), out="", arch="simple-cnn", batch=8, lr=0.1, cf="tile", cf_coeff=1.0,
                  reg="bbox_o", reg_coeff=10.0, reg_measure="raw")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = json.dumps([TrainConfig(**common, **run).to_dict() for run in runs])
    one = json.dumps([TrainConfig(**{**common, "batch": 16, "batch_split": 2}, **run).to_dict() for run in runs])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
                    two, str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(worker), one, str(tmp_path)], check=True, env=env, capture_output=True, timeout=300)
    torch.manual_seed(0)  # as make_model does for seed 0
    initial = build_model("simple-cnn", 2).state_dict()
    finals = []
    for index, run in enumerate(runs):
        single = torch.load(tmp_path / f"{index}-world1-rank0.pt", weights_only=True)
        for rank in (0, 1):
            ranked = torch.load(tmp_path / f"{index}-world2-rank{rank}.pt", weights_only=True)
            for name, tensor in single.items():
                assert torch.allclose(ranked[name], tensor, atol=1e-5, rtol=1e-4), (run, rank, name)
        assert not torch.allclose(single["0.weight"], initial["0.weight"])  # the steps did move the weights
        finals.append(single["0.weight"])
    for a, b in itertools.combinations(range(len(runs)), 2):
        assert not torch.allclose(finals[a], finals[b]), (runs[a], runs[b])  # each run steers differently


def test_torchrun_max_restarts_resumes_a_killed_rank_to_the_same_weights(tiny_shards, tmp_path):
    """Rank 1 is SIGKILLed in the middle of epoch 2; torchrun restarts both ranks, which --resume
    from the last mid-epoch checkpoint and end where an uninterrupted run ends."""
    worker = Path(__file__).with_name("crash_once_train.py")
    args = ["--shards", str(tiny_shards), "--arch", "simple-cnn", "--epochs", "2", "--batch", "8", "--workers", "1",
            "--device", "cpu", "--cf", "tile", "--f", "mrand", "--reg", "bbox_o", "--lr", "0.05", "--save-every", "2",
            "--resume"]  # mrand draws from each rank's own generator: the resumed ranks must get theirs back
    marker = tmp_path / "crashed"

    def torchrun(out: Path, crash_at: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_AT_STEP": str(crash_at), "CRASH_MARKER": str(marker),
               "STEP_LOG": str(out) + ".steps"}
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
             str(worker), *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stderr[-4000:]

    torchrun(tmp_path / "clean", crash_at=0)
    assert not marker.exists()
    torchrun(tmp_path / "killed", crash_at=9)  # 6 steps per epoch per rank: step 9 is inside epoch 2
    assert marker.exists()
    clean, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("clean", "killed"))
    assert resumed["step"] == clean["step"] == 12
    for name, tensor in clean["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    # The restarted ranks took only the steps after the last checkpoint (saved every 2 steps).
    finished = sorted(line.split() for line in (tmp_path / "killed.steps").read_text().splitlines())
    assert [(restart, rank) for restart, rank, _ in finished] == [("1", "0"), ("1", "1")]
    assert all(int(steps) in (4, 6) for _, _, steps in finished), finished
