"""What the commands refuse to write over, and the options they refuse, each in one line."""

from __future__ import annotations

import errno
import io
import shutil
import tarfile

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.errors import UserError, user_message
from cfrobust.trainer.checkpoint import save_checkpoint
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.models import build_model

TRAIN = ["train", "--arch", "simple-cnn", "--epochs", "1", "--batch", "32", "--workers", "0", "--device", "cpu"]


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, expected: str) -> None:
    assert code == 1, output
    assert output == f"Error: {expected}\n"


def test_overwrite_never_deletes_the_shards_or_files_the_run_did_not_write(tiny_shards, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_shards, project / "shards")
    (project / "notes.txt").write_text("mine")
    code, output = run_cli(*TRAIN, "--shards", project / "shards", "--out", project, "--overwrite")
    assert_one_line_error(code, output, f"--out {project} holds the input {project / 'shards'}: --overwrite would "
                                        f"delete it; choose another --out")
    (project / "run").mkdir()
    (project / "run" / "notes.txt").write_text("mine")
    code, output = run_cli(*TRAIN, "--shards", project / "shards", "--out", project / "run", "--overwrite")
    assert_one_line_error(code, output, f"--out {project / 'run'} holds 'notes.txt', which this command did not write: "
                                        f"--overwrite replaces only its own output; choose another --out")
    code, output = run_cli(*TRAIN, "--shards", project / "shards", "--out", project / "run")
    assert_one_line_error(code, output, f"{project / 'run'} holds 'notes.txt', which is not part of a run; choose another --out")
    assert (project / "notes.txt").read_text() == (project / "run" / "notes.txt").read_text() == "mine"
    assert (project / "shards" / "train" / "_info.json").is_file()


def test_a_file_where_the_run_folder_should_be_is_named(tiny_shards, tmp_path):
    (tmp_path / "afile").write_text("")
    code, output = run_cli(*TRAIN, "--shards", tiny_shards, "--out", tmp_path / "afile")
    assert_one_line_error(code, output, f"--out {tmp_path / 'afile'}: a file, not a folder; choose another --out")
    code, output = run_cli("preprocess", "--dataset", "synthetic", "--out", tmp_path / "afile" / "sub")
    assert_one_line_error(code, output, f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder")


def test_a_run_that_failed_before_its_first_checkpoint_can_start_again_in_its_folder(tiny_shards, tmp_path):
    run = tmp_path / "run"
    code, output = run_cli(*TRAIN, "--shards", tiny_shards, "--out", run, "--pretrained", tmp_path / "missing.pt")
    assert code == 1 and (run / "config.json").is_file() and not any((run / "checkpoints").iterdir())
    code, output = run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)
    assert code == 0, output
    assert (run / "eval.json").is_file()
    code, output = run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)
    assert code == 1 and "already holds a run" in output


def test_eval_and_show_never_write_over_their_inputs_or_into_a_folder(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    best = run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    code, output = run_cli("eval", "--checkpoint", best, "--shards", tiny_shards, "--out", best)
    assert_one_line_error(code, output, f"--out {best} is this command's input; choose another --out")
    code, output = run_cli("eval", "--checkpoint", best, "--shards", tiny_shards, "--out", run)
    assert_one_line_error(code, output, f"--out {run}: a folder; give a file name")
    code, output = run_cli("show", "--shards", tiny_shards, "--checkpoint", best, "--out", best)
    assert_one_line_error(code, output, f"--out {best}: the grid is a PNG picture; give a .png file name")
    code, output = run_cli("report", run, "--out", run / "eval.json", "--format", "json")
    assert_one_line_error(code, output, f"--out {run / 'eval.json'} is this command's input; choose another --out")
    assert best.read_bytes() == before


def test_demo_overwrite_replaces_only_an_earlier_demo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, output = run_cli("demo", "--out", tmp_path, "--overwrite")
    assert_one_line_error(code, output, f"--out {tmp_path} holds 'notes.txt', which this command did not write: "
                                        f"--overwrite replaces only its own output; choose another --out")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, member", [([], "shapes"), (["--variant", "four-class"], "four-class")])
def test_demo_makes_its_shards_from_the_named_family_member(tmp_path, monkeypatch, args, member):
    import cfrobust.preprocess.pipeline as pipeline

    made = []

    class Stop(Exception):
        pass

    def preprocess(dataset, out, fills, **options):
        made.append((dataset.variant.name, fills))
        raise Stop  # before training

    monkeypatch.setattr(pipeline, "preprocess", preprocess)
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), *args])
    assert isinstance(result.exception, Stop), result.output
    assert made == [(member, ["tile"])]


@pytest.mark.parametrize("args, impl, every", [
    ([], "exact", 1),
    (["--reg-impl", "finite-diff"], "finite-diff", 1),
    (["--reg-impl", "finite-diff", "--reg-every", "2"], "finite-diff", 2),
    (["--reg-every", "3"], "exact", 3),
])
def test_demo_passes_reg_impl_and_reg_every_to_the_method_only(tmp_path, monkeypatch, args, impl, every):
    import cfrobust.preprocess.pipeline as pipeline
    import cfrobust.trainer.train as trainer

    configs = {}
    monkeypatch.setattr(pipeline, "preprocess", lambda dataset, out, *a, **k: out.mkdir(parents=True))
    monkeypatch.setattr(trainer, "train", lambda config: configs.setdefault(config.out.rsplit("/", 1)[-1], config) and {})
    monkeypatch.setattr("cfrobust.trainer.report.summary_markdown", lambda documents, split: "")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), *args])
    assert result.exit_code == 0, result.output
    assert configs["method"].reg_impl == impl and configs["method"].reg == "bbox_o"
    assert configs["method"].reg_every == every
    assert configs["erm"].reg == "none" and configs["erm"].reg_impl == "exact" and configs["erm"].reg_every == 1


@pytest.mark.parametrize("args, factual", [([], "F(mrand, any, replace, blend edge)"), (["--variant", "four-class"], "F(mrand, weight 3)")])
def test_demo_names_the_factual_pairing_its_member_trains_with(tmp_path, monkeypatch, args, factual):
    import cfrobust.preprocess.pipeline as pipeline
    import cfrobust.trainer.train as trainer

    monkeypatch.setattr(pipeline, "preprocess", lambda dataset, out, *a, **k: out.mkdir(parents=True))
    monkeypatch.setattr(trainer, "train", lambda config: {})
    monkeypatch.setattr("cfrobust.trainer.report.summary_markdown", lambda documents, split: "")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), *args])
    assert result.exit_code == 0, result.output
    assert f"3/3 training method: CF(tile, uni, 0.5) + {factual} + Sal(bbox_o, grad_y, λ=0.1)" in result.output.splitlines()


@pytest.mark.parametrize("options, expected", [
    (["--workers", "-1"], "--workers -1: must be 0 (load in this process) or more"),
    (["--lr", "0"], "--lr 0: a learning rate must be positive"),
    (["--label-smoothing", "1"], "--label-smoothing 1: must lie in [0, 1)"),
    (["--f-steps", "0"], "--f-steps 0: an attack takes at least 1 step"),
    (["--reg-coeff", "-5"], "--reg-coeff -5: a loss weight must be 0 or more"),
    (["--batch-split", "64"], "--batch-split 64 cuts a batch of 32 into more chunks than images"),
    (["--device", "gpu"], "--device gpu: not a device; use auto, cpu, cuda or cuda:N"),
    (["--reg", "bbox_o", "--reg-anneal", "1"], "--reg-anneal 1 with --epochs 1: the saliency weight would never reach "
                                                "--reg-coeff; anneal over fewer epochs than the run has"),
    (["--reg-anneal", "1.5"], "--reg-anneal 1.5: must be auto or a whole number of epochs (0: no ramp)"),
    (["--reg-every", "0"], "--reg-every 0: must be at least 1 (1: the penalty on every step)"),
])
def test_out_of_range_training_options_are_named_with_their_value(tiny_shards, tmp_path, options, expected):
    args = [a for a in TRAIN if a not in ("--device", "cpu")] if "--device" in options else TRAIN
    code, output = run_cli(*args, "--shards", tiny_shards, "--out", tmp_path / "run", *options)
    assert_one_line_error(code, output, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, expected", [
    (["--synthetic-sizes", "10,abc"], "Invalid value for --synthetic-sizes: '10,abc': expected TRAIN,VAL,TEST image counts"),
    (["--dataset", "coco", "--images", ".", "--annotations", "../up=a.json"],
     "Invalid value for --annotations: '../up=a.json': the split '../up' must be a plain folder name"),
    (["--dataset", "coco", "--images", ".", "--annotations", "train=a.json", "--annotations", "train=a.json"],
     "Invalid value for --annotations: 'train=a.json': split 'train' is given twice"),
])
def test_malformed_preprocess_values_are_usage_errors(tmp_path, monkeypatch, options, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.json").write_text("{}")
    args = ["--dataset", "synthetic", *options] if options[0] != "--dataset" else options
    result = CliRunner().invoke(cli, ["preprocess", *args, "--out", "s"])
    assert result.exit_code == 2 and result.output.splitlines()[-1] == f"Error: {expected}", result.output


@pytest.mark.parametrize("options, expected", [
    (["--shard-size", "0"], "--shard-size 0: a shard holds at least 1 sample"),
    (["--size", "-32"], "--size -32: stored images are 8 to 4096 pixels a side"),
    (["--workers", "0"], "--workers 0: at least 1 process builds the samples"),
])
def test_out_of_range_preprocess_options_are_named_with_their_value(tmp_path, options, expected):
    code, output = run_cli("preprocess", "--dataset", "synthetic", "--out", tmp_path / "s", *options)
    assert_one_line_error(code, output, expected)


def test_training_on_one_class_is_refused(tmp_path):
    from cfrobust.datasets import open_dataset
    from cfrobust.preprocess.pipeline import preprocess

    images = tmp_path / "images" / "train" / "bird"  # the folder dataset: one class folder
    images.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.png"), np.full((16, 16, 3), 60 * i, np.uint8))
    preprocess(open_dataset("folder", root=tmp_path / "images"), tmp_path / "s", ["tile"], progress=False)
    code, output = run_cli(*TRAIN, "--shards", tmp_path / "s", "--out", tmp_path / "run", "--batch", "2")
    assert_one_line_error(code, output, f"{tmp_path / 's'}/train: 1 class (bird); a classifier needs at least 2")


def test_eval_refuses_shards_of_other_classes(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other, dirs_exist_ok=True)
    info = (other / "test" / "_info.json").read_text().replace('"disk"', '"cat"')
    (other / "test" / "_info.json").write_text(info)
    code, output = run_cli("eval", "--checkpoint", run / "checkpoints" / "best.pt", "--shards", other,
                           "--splits", "test", "--out", tmp_path / "e.json")
    assert_one_line_error(code, output, f"{run / 'checkpoints' / 'best.pt'}: trained on classes ['disk', 'ring'], "
                                        f"but {other / 'test'} has ['cat', 'ring']")


def test_a_loader_workers_error_reaches_the_user_as_its_own_line(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    broken = sorted((shards / "train").glob("*.tar"))[0]
    broken.write_bytes(bytes(range(1, 256)) * 4)
    args = [a if a != "0" else "1" for a in TRAIN]  # --workers 1: the tar is read in a worker process
    code, output = run_cli(*args, "--shards", shards, "--out", tmp_path / "run")
    assert code == 1 and output.startswith(f"Error: {broken}: not a readable tar at byte 512") and output.count("\n") == 1


def test_user_message_keeps_the_last_line_of_a_workers_traceback():
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\ncfrobust.errors.UserError: a.tar: sample k: bad\n')
    assert user_message(wrapped) == "a.tar: sample k: bad"
    assert user_message(UserError("plain")) == "plain"


def test_preprocess_that_writes_no_sample_fails(tmp_path):
    code, output = run_cli("preprocess", "--dataset", "synthetic", "--synthetic-sizes", "0,0,0", "--out", tmp_path / "s")
    assert code == 1 and output.endswith(f"Error: {tmp_path / 's'}: no sample was written (every split is empty or every "
                                         f"record was skipped)\n")


def test_overwrite_through_a_symbolic_link_is_refused_and_deletes_nothing(tiny_shards, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "config.json").write_text("{}")
    link.symlink_to(real)
    code, output = run_cli(*TRAIN, "--shards", tiny_shards, "--out", link, "--overwrite")
    assert_one_line_error(code, output, f"--out {link} is a symbolic link; --overwrite replaces only a real folder: "
                                        f"give the folder it names ({real}) or another --out")
    assert (real / "config.json").read_text() == "{}" and link.is_symlink()


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_in_place(tiny_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "tensorboard").mkdir()
    (run / "config.json").write_text("{}")
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "eval.json").is_file()


def test_a_preprocess_rank_with_an_empty_slice_succeeds_and_says_so(tmp_path):
    args = ("preprocess", "--dataset", "synthetic", "--synthetic-sizes", "1,1,1", "--out", tmp_path / "s", "--world-size", "2")
    code, output = run_cli(*args, "--rank", "1")
    assert code == 0 and "\nrank 1 wrote no sample: its slice of every split is empty or was skipped\n" in output
    assert run_cli(*args, "--rank", "0")[0] == 0


def test_eval_refuses_a_truncated_shard_instead_of_scoring_part_of_the_split(tiny_shards, tmp_path):
    run, shards = tmp_path / "run", tmp_path / "shards"
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    shutil.copytree(tiny_shards, shards)
    shard = shards / "test" / "test-000000.tar"
    with tarfile.open(shard) as archive:  # the first 8 of its 16 samples, each a whole sample
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})[:8]
    with tarfile.open(shard, "w") as archive:
        for member, data in members:
            if member.name.split(".")[0] in keys:
                archive.addfile(member, io.BytesIO(data))
    code, output = run_cli("eval", "--checkpoint", run / "checkpoints" / "best.pt", "--shards", shards, "--out", tmp_path / "e.json")
    assert_one_line_error(code, output, f"{shard}: holds 8 samples where _info.json counts 16; `cfrobust shards verify` "
                                        f"finds the damage")


def test_a_split_folder_given_as_the_shard_root_is_named_by_every_command(tiny_shards, tmp_path):
    message = f"{tiny_shards / 'val'} is one split's folder; pass the shard root above it to --shards"
    code, output = run_cli(*TRAIN, "--shards", tiny_shards / "val", "--out", tmp_path / "run")
    assert_one_line_error(code, output, message)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, {"model": build_model("simple-cnn", 2).state_dict(),
                                 "config": TrainConfig(arch="simple-cnn").to_dict(), "classes": ["disk", "ring"]})
    code, output = run_cli("eval", "--checkpoint", checkpoint, "--shards", tiny_shards / "val", "--out", tmp_path / "e.json")
    assert_one_line_error(code, output, message)


def test_eval_out_replaces_an_earlier_eval_json_and_nothing_else(tiny_shards, tmp_path):
    run, shards = tmp_path / "run", tmp_path / "shards"
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    shutil.copytree(tiny_shards, shards)
    evaluate = ("eval", "--checkpoint", run / "checkpoints" / "best.pt", "--shards", shards, "--out")
    manifest = shards / "val" / "_info.json"
    code, output = run_cli(*evaluate, manifest)
    assert_one_line_error(code, output, f"--out {manifest} lies inside --shards {shards}; write the eval JSON elsewhere")
    last = run / "checkpoints" / "last.pt"
    code, output = run_cli(*evaluate, last)
    assert_one_line_error(code, output, f"--out {last} exists and is not an eval JSON; --out replaces only an earlier "
                                        f"one: choose another")
    assert manifest.read_bytes() == (tiny_shards / "val" / "_info.json").read_bytes()
    assert run_cli(*evaluate, run / "eval.json")[0] == 0  # the run's own eval JSON may be rescored


def test_a_full_disk_is_one_line_and_leaves_no_half_written_shard(tmp_path, monkeypatch):
    from cfrobust.shards import writer

    written = {"bytes": 0}
    real_write = writer._HashingFile.write

    def filling_write(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 20_000:  # the disk fills up inside the first shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(writer._HashingFile, "write", filling_write)
    code, output = run_cli("preprocess", "--dataset", "synthetic", "--out", tmp_path / "s", "--workers", "1")
    assert code == 1 and output.splitlines()[-1] == "Error: No space left on device"  # after the progress bar
    assert [p.name for p in (tmp_path / "s" / "train").iterdir() if p.suffix == ".tmp"] == []


def test_a_folder_the_user_may_not_write_is_named(tmp_path, monkeypatch):
    from cfrobust.preprocess import pipeline

    def denied(folder, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "_info.json"))

    monkeypatch.setattr(pipeline, "write_info", denied)
    code, output = run_cli("preprocess", "--dataset", "synthetic", "--synthetic-sizes", "4,0,0", "--out", tmp_path / "s")
    assert code == 1 and output.splitlines()[-1] == f"Error: {tmp_path / 's' / 'train' / '_info.json'}: Permission denied"


def test_eval_with_nothing_to_score_says_so(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*TRAIN, "--shards", tiny_shards, "--out", run)[0] == 0
    only_train = tmp_path / "only-train"
    shutil.copytree(tiny_shards / "train", only_train / "train")
    code, output = run_cli("eval", "--checkpoint", run / "checkpoints" / "best.pt", "--shards", only_train,
                           "--out", tmp_path / "e.json")
    assert_one_line_error(code, output, f"{only_train}: no split to score besides train; pass --splits train to score that one")


def test_a_file_as_shards_and_an_empty_train_split_are_named(tmp_path):
    (tmp_path / "afile").write_text("")
    code, output = run_cli(*TRAIN, "--shards", tmp_path / "afile", "--out", tmp_path / "run")
    assert_one_line_error(code, output, f"{tmp_path / 'afile'}: a file, not a shard folder")
    assert run_cli("preprocess", "--dataset", "synthetic", "--synthetic-sizes", "0,8,8", "--out", tmp_path / "s")[0] == 0
    code, output = run_cli(*TRAIN, "--shards", tmp_path / "s", "--out", tmp_path / "run")
    assert_one_line_error(code, output, f"{tmp_path / 's' / 'train'}: the split holds no samples to train on")
