"""Crash-safe training: checkpoints, --resume, presets, schedules, gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.errors import UserError
from cfrobust.shards.reader import Batch
from cfrobust.trainer.checkpoint import load_checkpoint, save_checkpoint
from cfrobust.trainer.config import TrainConfig
from cfrobust.distributed import DistEnv
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.optim import Schedule, make_optimizer
from cfrobust.trainer.train import Precision, TrainingParts, optimizer_step, train

ARGS = ["--arch", "simple-cnn", "--epochs", "2", "--batch", "16", "--workers", "0", "--device", "cpu",
        "--cf", "tile", "--f", "mrand", "--reg", "bbox_o", "--lr", "0.05"]


def config_of(shards, out, **extra) -> TrainConfig:
    options = dict(arch="simple-cnn", epochs=2, batch=16, workers=0, device="cpu", cf="tile", f="mrand", reg="bbox_o", lr=0.05)
    return TrainConfig(shards=str(shards), out=str(out), **{**options, **extra})


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(tiny_shards, tmp_path):
    clean = tmp_path / "clean"
    train(config_of(tiny_shards, clean))
    run = tmp_path / "killed"
    worker = Path(__file__).with_name("slow_train.py")
    process = subprocess.Popen([sys.executable, str(worker), "--shards", str(tiny_shards), "--out", str(run),
                                "--save-every", "2", *ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if last.exists() and load_checkpoint(last)["step"] >= 8:  # epoch 2 of 6 steps each, mid-way
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = load_checkpoint(last)
    assert 8 <= saved["step"] < 12 and saved["state"]["batches_done"] > 0  # killed inside epoch 2
    assert not (run / "eval.json").exists()
    train(config_of(tiny_shards, run, resume=True, save_every=2))
    resumed, reference = load_checkpoint(last), load_checkpoint(clean / "checkpoints" / "last.pt")
    assert resumed["step"] == reference["step"] == 12
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((run / "eval.json").read_text())["splits"] == json.loads((clean / "eval.json").read_text())["splits"]


def test_resume_of_a_finished_run_does_not_train_again(tiny_shards, tmp_path):
    first = train(config_of(tiny_shards, tmp_path / "run", epochs=1))
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    again = train(config_of(tiny_shards, tmp_path / "run", epochs=1, resume=True))
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert after["step"] == before["step"] == 6
    assert again["splits"] == first["splits"]


def test_resume_with_arch_auto_continues_the_net_the_run_recorded(tiny_shards, tmp_path):
    first = train(config_of(tiny_shards, tmp_path / "run", epochs=1, arch="resnet18"))  # e.g. a former default
    again = train(config_of(tiny_shards, tmp_path / "run", epochs=1, arch="auto", resume=True))
    assert again["splits"] == first["splits"] and again["config"]["arch"] == "resnet18"
    with pytest.raises(UserError, match=r"made with other options \(arch\)"):  # a named net is still checked
        train(config_of(tiny_shards, tmp_path / "run", epochs=1, arch="simple-cnn", resume=True))


def test_resume_with_other_options_is_refused(tiny_shards, tmp_path):
    train(config_of(tiny_shards, tmp_path / "run", epochs=1))
    with pytest.raises(UserError, match=r"made with other options \(lr\)"):
        train(config_of(tiny_shards, tmp_path / "run", epochs=1, resume=True, lr=0.1))


def rewrite_checkpoint(path: Path, change) -> None:
    saved = load_checkpoint(path)
    change(saved)
    save_checkpoint(path, saved)


def test_resume_with_another_loader_stream_is_refused_until_the_run_is_finished(tiny_shards, tmp_path):
    # Batches per epoch depend on processes x loader workers; --workers 0 and 1 read alike.
    run = tmp_path / "run"
    finished = train(config_of(tiny_shards, run, epochs=1, workers=0))
    assert train(config_of(tiny_shards, run, epochs=1, resume=True, workers=2))["splits"] == finished["splits"]
    # The same checkpoint as one of a 2-epoch run stopped after its first epoch:
    rewrite_checkpoint(run / "checkpoints" / "last.pt", lambda saved: saved["config"].update(epochs=2))
    with pytest.raises(UserError, match=r"as 1 process\(es\) x 1 loader worker\(s\); resume it with the same \(now 1 x 2\)"):
        train(config_of(tiny_shards, run, epochs=2, resume=True, workers=2))
    train(config_of(tiny_shards, run, epochs=2, resume=True, workers=1))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12


def test_an_option_a_checkpoint_predates_counts_as_its_default(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = train(config_of(tiny_shards, run, epochs=1))
    rewrite_checkpoint(run / "checkpoints" / "last.pt", lambda saved: saved["config"].pop("clip_grad"))
    with pytest.raises(UserError, match=r"made with other options \(clip_grad\)"):
        train(config_of(tiny_shards, run, epochs=1, resume=True, clip_grad=1.0))
    assert train(config_of(tiny_shards, run, epochs=1, resume=True))["splits"] == first["splits"]


def test_resume_with_overwrite_is_refused_before_anything_is_deleted(tiny_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # a run that stopped before its first checkpoint
    with pytest.raises(UserError, match=r"^--resume keeps the run in --out and --overwrite deletes it: choose one$"):
        train(config_of(tiny_shards, run, resume=True, overwrite=True))
    assert (run / "config.json").read_text() == "{}"


def test_resume_without_a_checkpoint_starts_fresh(tiny_shards, tmp_path):
    document = train(config_of(tiny_shards, tmp_path / "run", epochs=1, resume=True))
    assert document["best_epoch"] == 1


def test_preset_values_yield_to_explicit_options(tiny_shards, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--shards", str(tiny_shards), "--out", str(run), "--preset", "waterbirds",
                                      "--epochs", "1", "--batch", "16", "--arch", "simple-cnn", "--workers", "0",
                                      "--crop", "24", "--eval-size", "32", "--no-hflip"])  # the shards hold 32-px images
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["hflip"] is False and config["object_region"] == "mask"  # --no-hflip beats the preset's flip
    assert (config["optimizer"], config["lr"], config["momentum"], config["weight_decay"]) == ("sgd", 8e-4, 0.9, 1e-4)
    assert (config["scheduler"], config["epochs"], config["batch"], config["clip_grad"]) == ("plateau", 1, 16, 1.0)
    assert (config["arch"], config["crop"], config["eval_size"], config["normalize"]) == ("simple-cnn", 24, 32, "bit")


def test_step_schedule_decays_at_the_milestone_epochs():
    model = torch.nn.Linear(2, 2)
    config = TrainConfig(optimizer="sgd", lr=1.0, scheduler="step", milestones="1,3", gamma=0.1, epochs=4)
    optimizer = make_optimizer(model, config)
    schedule = Schedule(optimizer, config, steps_per_epoch=5)
    rates = []
    for _ in range(4):
        optimizer.step()
        schedule.after_step()  # per-step calls do not move a step schedule
        schedule.after_epoch(val_loss=1.0)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.01])


def test_plateau_schedule_decays_after_patience_epochs_without_progress():
    optimizer = make_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="sgd", lr=1.0))
    schedule = Schedule(optimizer, TrainConfig(scheduler="plateau", gamma=0.5), steps_per_epoch=1)
    for _ in range(7):
        schedule.after_epoch(val_loss=1.0)  # never improves after the first
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


@pytest.mark.parametrize("terms", [{}, dict(cf="tile", reg="bbox_o", f="shuffle")], ids=["erm", "cf-sal-f"])
def test_batch_split_accumulates_the_same_gradient_as_one_pass(terms):
    # One boxed sample, in the first of three chunks: each term is still the whole batch's mean.
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    boxed = torch.tensor([[True], [False], [False], [False], [False], [False]])
    batch = Batch(images=images, labels=torch.tensor([0, 1, 0, 1, 1, 0]), boxes=torch.tensor([[[2.0, 2.0, 6.0, 6.0]]] * 6),
                  box_valid=boxed, cf={"tile": torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)},
                  groups=["g"] * 6, keys=[str(i) for i in range(6)])
    found = []
    for split in (1, 3):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2))
        config = TrainConfig(batch_split=split, lr=0.0, **terms)
        optimizer = make_optimizer(model, config)
        parts = TrainingParts(model, Objective(config, torch.Generator().manual_seed(0), num_classes=2), optimizer, Schedule(optimizer, config, 1),
                              Precision("32", torch.device("cpu")), torch.Generator(), DistEnv(0, 1, 0, torch.device("cpu")), config)
        step_terms, logits, _ = optimizer_step(parts, batch)
        found.append((model[3].weight.grad.clone(), {k: float(v) for k, v in step_terms.items()}, logits.shape))
    torch.testing.assert_close(found[1][0], found[0][0], rtol=1e-5, atol=1e-7)
    assert set(found[0][1]) == {"ce", *(["cf", "sal"] if terms else [])}
    assert found[1][1] == pytest.approx(found[0][1], rel=1e-5)
    assert found[0][2] == found[1][2] == (6, 2)


def test_chunks_cover_the_batch_in_order():
    batch = Batch(images=torch.zeros(5, 3, 2, 2, dtype=torch.uint8), labels=torch.arange(5), boxes=torch.zeros(5, 1, 4),
                  box_valid=torch.zeros(5, 1, dtype=torch.bool), groups=list("abcde"), keys=list("vwxyz"))
    chunks = batch.chunks(2)
    assert [c.labels.tolist() for c in chunks] == [[0, 1], [2, 3, 4]]
    assert [c.keys for c in chunks] == [["v", "w"], ["x", "y", "z"]]


def test_the_loaders_pinning_reaches_every_tensor_of_a_batch(monkeypatch):
    # No GPU here to pin for: a stand-in pin_memory marks each tensor it copies.
    from torch.utils.data._utils.pin_memory import pin_memory
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *args: pinned.append(t) or t.clone())
    batch = Batch(images=torch.ones(2, 3, 2, 2, dtype=torch.uint8), labels=torch.arange(2), boxes=torch.zeros(2, 1, 4),
                  box_valid=torch.ones(2, 1, dtype=torch.bool), cf={"tile": torch.zeros(2, 3, 2, 2, dtype=torch.uint8)},
                  groups=["a", "b"], keys=["k0", "k1"])
    out = pin_memory(batch)
    assert isinstance(out, Batch) and len(pinned) == 5
    assert torch.equal(out.images, batch.images) and out.images is not batch.images
    assert torch.equal(out.cf["tile"], batch.cf["tile"]) and out.keys == ["k0", "k1"]


def test_clipping_scales_the_whole_gradient_to_the_given_norm():
    weights = torch.nn.Parameter(torch.zeros(2))
    bias = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weights, bias], lr=1.0)
    weights.grad, bias.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    Precision("32", torch.device("cpu")).step(optimizer, clip_norm=1.0)
    assert torch.allclose(weights.detach(), torch.tensor([-0.6, 0.0])) and torch.allclose(bias.detach(), torch.tensor([-0.8]))
    weights.grad, bias.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.4])  # norm 0.5: left alone
    Precision("32", torch.device("cpu")).step(optimizer, clip_norm=1.0)
    assert torch.allclose(weights.detach(), torch.tensor([-0.9, 0.0])) and torch.allclose(bias.detach(), torch.tensor([-1.2]))


def test_fp16_with_a_saliency_penalty_by_double_backpropagation_is_refused(tiny_shards, tmp_path):
    with pytest.raises(UserError, match=r"--precision 16 with --reg and --reg-impl exact: .* use --reg-impl finite-diff"):
        train(config_of(tiny_shards, tmp_path / "run", precision="16"))


def test_a_negative_clip_norm_is_refused(tiny_shards, tmp_path):
    with pytest.raises(UserError, match=r"--clip-grad -1: a gradient norm cannot be negative"):
        train(config_of(tiny_shards, tmp_path / "run", clip_grad=-1.0))


def test_fp16_needs_a_gpu(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="--precision 16 needs a CUDA device"):
        train(config_of(tiny_shards, tmp_path / "run", precision="16", reg="none"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match="--precision 16 needs a CUDA device"):  # past the penalty's check
        train(config_of(tiny_shards, tmp_path / "run", precision="16", reg_impl="finite-diff"))


def test_fp16_unscales_the_gradients_before_clipping_them():
    # Training runs fp16 on the GPU only; its loss scaling is the same on the CPU. Clipping the
    # still-scaled gradients would shrink the step by the loss scale (65536) instead.
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = Precision("16", torch.device("cpu"))
    with precision.autocast():
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.arange(8) % 3)
    assert loss.dtype == torch.float32 and model(torch.randn(1, 6)).dtype == torch.float32  # autocast ended
    precision.backward(loss)
    assert precision.scaler.get_scale() == 65536.0
    precision.step(optimizer, clip_norm=0.01)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-3)  # lr 1: the step is the clipped gradient
    assert precision.scaler.state_dict()["_growth_tracker"] == 1  # a finite step was counted


def test_ranks_that_disagree_about_the_checkpoint_all_stop(monkeypatch, tmp_path):
    import cfrobust.trainer.train as train_module

    env = DistEnv(0, 3, 0, torch.device("cpu"))
    monkeypatch.setattr(train_module, "gather_objects", lambda found, env: [True, False, True])
    with pytest.raises(UserError, match=r"last.pt: rank\(s\) 1 cannot see it; --out must be on a filesystem that every node sees$"):
        train_module.check_ranks_agree(tmp_path, True, env)
    monkeypatch.setattr(train_module, "gather_objects", lambda found, env: [False, False, False])
    train_module.check_ranks_agree(tmp_path, False, env)  # a fresh run everywhere
