"""Shard roots behind a URL: a loopback HTTP server (Range requests, a connection dropped once),
fsspec's memory:// store (preprocess uploads, resume from the remote journal) and pipe: commands
give the same data, weights and figures as the local folder; failures are one line naming the URL."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
import torch
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.datasets import open_dataset
from cfrobust.preprocess.pipeline import preprocess
from cfrobust.shards import remote
from cfrobust.shards.manifest import list_splits, read_info
from cfrobust.shards.reader import EvalShards
from cfrobust.trainer.checkpoint import load_checkpoint
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.train import train
from cfrobust.trainer.visualize import choose_samples
from remote_helpers import ShardServer, free_port

SYNTHETIC = ["--dataset", "synthetic", "--seed", "3", "--synthetic-sizes", "96,32,32", "--synthetic-image-size", "32",
             "--cf", "tile", "--shard-size", "16"]
TAR_COUNT = 10  # 96/32/32 samples in shards of 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "shards"
    preprocess(open_dataset("synthetic", seed=3, sizes=(96, 32, 32), image_size=32), folder, ["tile"],
               shard_size=16, progress=False)
    return folder


@pytest.fixture
def server(shards):
    with ShardServer(shards.parent) as running:
        yield running


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_WAIT", 0.01)


def run_config(shards, out, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), out=str(out), arch="simple-cnn", epochs=2, batch=32, lr=0.05, workers=0,
                   device="cpu", cf="tile")
    return TrainConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def local_run(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    return run, train(run_config(shards, run))


def assert_same_run(run, document, local_run) -> None:
    local, local_document = local_run
    mine, theirs = load_checkpoint(run / "checkpoints" / "last.pt")["model"], load_checkpoint(local / "checkpoints" / "last.pt")["model"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert document["splits"] == local_document["splits"] and document["derived"] == local_document["derived"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val"] == \
        json.loads((local / "metrics.jsonl").read_text().splitlines()[-1])["val"]


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_train_and_eval_from_http_give_the_local_weights_and_figures(server, local_run, tmp_path):
    url = f"{server.url}/shards"
    assert list_splits(url) == ["train", "val", "test"]  # from the server's folder index
    run = tmp_path / "run"
    assert_same_run(run, train(run_config(url, run)), local_run)
    assert server.requests["/shards/train/train-000000.tar"] == 2  # streamed every epoch (no cache)
    runner = CliRunner()
    checkpoint = str(local_run[0] / "checkpoints" / "best.pt")
    from_url = runner.invoke(cli, ["eval", "--checkpoint", checkpoint, "--shards", url, "--out", str(tmp_path / "a.json"),
                                   "--workers", "1"])
    assert from_url.exit_code == 0, from_url.output
    figures = json.loads((tmp_path / "a.json").read_text())
    assert figures["splits"] == local_run[1]["splits"] and figures["derived"] == local_run[1]["derived"]


def test_a_connection_dropped_mid_shard_resumes_at_its_byte(server, local_run, tmp_path):
    server.drop_once.update({"/shards/train/train-000003.tar", "/shards/val/val-000001.tar"})
    run = tmp_path / "run"
    assert_same_run(run, train(run_config(f"{server.url}/shards", run)), local_run)
    assert sorted(server.dropped) == ["/shards/train/train-000003.tar", "/shards/val/val-000001.tar"]
    resumed = dict(server.ranges)  # each continued where its bytes stopped, not from the start
    size = len((remote.location(f"{server.url}/shards") / "train" / "train-000003.tar").read_bytes())
    assert resumed["/shards/train/train-000003.tar"] == size // 2


def test_cache_dir_reads_each_shard_from_the_network_once_over_two_epochs(server, local_run, tmp_path):
    cache = tmp_path / "cache"
    run = tmp_path / "run"
    assert_same_run(run, train(run_config(f"{server.url}/shards", run, cache_dir=str(cache))), local_run)
    tars = {path: count for path, count in server.requests.items() if path.endswith(".tar")}
    assert len(tars) == TAR_COUNT and set(tars.values()) == {1}
    digests = {entry["sha256"] for split in ("train", "val", "test") for entry in read_info(f"{server.url}/shards/{split}")["shards"]}
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{digest}.tar" for digest in digests)  # no temporaries left


def test_a_missing_shard_is_one_line_naming_its_url(shards, tmp_path):
    copy = tmp_path / "served" / "shards"
    shutil.copytree(shards, copy)
    (copy / "train" / "train-000002.tar").unlink()
    with ShardServer(copy.parent) as server:
        result = CliRunner().invoke(cli, ["train", "--shards", f"{server.url}/shards", "--out", str(tmp_path / "run"),
                                          "--arch", "simple-cnn", "--epochs", "1", "--batch", "32", "--device", "cpu",
                                          "--workers", "1"])
    assert one_line(result) == f"Error: {server.url}/shards/train/train-000002.tar: not found (HTTP 404)"


def test_an_unreachable_host_is_one_line_naming_its_url(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 2)
    url = f"http://127.0.0.1:{free_port()}/shards"
    result = CliRunner().invoke(cli, ["train", "--shards", url, "--out", str(tmp_path / "run"), "--arch", "simple-cnn",
                                      "--device", "cpu"])
    line = one_line(result)
    assert line.startswith(f"Error: {url}") and "could not be read after 3 tries (Connection refused)" in line


def test_preprocess_to_memory_then_train_from_it(shards, local_run, tmp_path):
    runner = CliRunner()
    url = "memory://e2e/shards"
    made = runner.invoke(cli, ["preprocess", *SYNTHETIC, "--out", url])
    assert made.exit_code == 0, made.output
    for split in ("train", "val", "test"):  # byte for byte the local shards
        assert read_info(f"{url}/{split}")["shards"] == read_info(shards / split)["shards"]
    assert not fsspec.filesystem("memory").glob("/e2e/shards/*/_progress*")  # journals removed when done
    verified = runner.invoke(cli, ["shards", "verify", url])
    assert verified.exit_code == 0 and "train: OK, 6 shards, 96 samples" in verified.output
    again = runner.invoke(cli, ["preprocess", *SYNTHETIC, "--out", url])
    assert "already holds output; pass --resume" in one_line(again)
    run = tmp_path / "run"
    assert_same_run(run, train(run_config(url, run)), local_run)


def test_a_killed_remote_preprocess_resumes_from_the_remote_journal(shards, monkeypatch):
    url = "memory://killed/shards"
    real_upload, uploads = remote.upload, []

    def dying_upload(local, target):
        if str(target).endswith(".tar"):
            uploads.append(str(target))
            if len(uploads) == 4:  # the process dies while uploading its fourth shard
                raise KeyboardInterrupt
        real_upload(local, target)

    monkeypatch.setattr(remote, "upload", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        preprocess(open_dataset("synthetic", seed=3, sizes=(96, 32, 32), image_size=32), url, ["tile"],
                   shard_size=16, progress=False)
    monkeypatch.setattr(remote, "upload", real_upload)
    memory = fsspec.filesystem("memory")
    assert memory.isfile("/killed/shards/train/_progress.jsonl") and not memory.isfile("/killed/shards/train/_info.json")
    resumed = CliRunner().invoke(cli, ["preprocess", *SYNTHETIC, "--out", url, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "96 samples written, 0 skipped (3 shards kept from the interrupted run)" in resumed.output
    for split in ("train", "val", "test"):
        assert read_info(f"{url}/{split}")["shards"] == read_info(shards / split)["shards"]


def test_verify_and_pipe_read_remote_roots(shards, server, tmp_path):
    runner = CliRunner()
    verified = runner.invoke(cli, ["shards", "verify", f"{server.url}/shards"])
    assert verified.exit_code == 0, verified.output
    assert verified.output.splitlines() == ["train: OK, 6 shards, 96 samples", "val: OK, 2 shards, 32 samples",
                                            "test: OK, 2 shards, 32 samples"]
    pipe = f"pipe:cat {shards}/{{}}"
    assert list_splits(pipe) == ["train", "val", "test"]
    keys = [key for batch in EvalShards(remote.location(pipe) / "val", 8) for key in batch.keys]
    assert keys == [key for batch in EvalShards(shards / "val", 8) for key in batch.keys] and len(keys) == 32
    shown, _, _ = choose_samples(f"{server.url}/shards", "test", 5, seed=1)  # what `cfrobust show` draws
    assert [s["key"] for s in shown] == [s["key"] for s in choose_samples(shards, "test", 5, seed=1)[0]]
    damaged = tmp_path / "damaged" / "shards"
    shutil.copytree(shards, damaged)
    with open(damaged / "val" / "val-000001.tar", "r+b") as tar:
        tar.seek(600)
        tar.write(b"x")
    with ShardServer(damaged.parent) as other:
        result = runner.invoke(cli, ["shards", "verify", f"{other.url}/shards"])
    assert result.exit_code == 1 and "val/val-000001.tar: sha256 mismatch" in result.output


def test_cagan_trains_from_and_to_memory_and_resumes_from_the_uploaded_state(shards, tmp_path):
    memory = fsspec.filesystem("memory")
    memory.put(str(shards), "/cagan/shards", recursive=True)
    args = ["cagan", "train", "--shards", "memory://cagan/shards", "--out", "memory://cagan/w.pt", "--split", "val",
            "--batch", "4", "--cnum", "4", "--critic-steps", "1", "--pretrain-steps", "2", "--sample-every", "1",
            "--save-every", "1", "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    first = runner.invoke(cli, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert {"/cagan/w.pt", "/cagan/w.pt.state", "/cagan/w.samples/step-000001.png"} <= set(memory.find("/cagan"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(f"{s['sha256']}.tar" for s in read_info(shards / "val")["shards"])
    assert one_line(runner.invoke(cli, [*args, "--steps", "3"])) == \
        "Error: memory://cagan/w.pt already exists; pass --resume to continue that training, or choose another --out"
    resumed = runner.invoke(cli, [*args, "--steps", "3", "--resume"])
    assert resumed.exit_code == 0 and "trained 3 steps" in resumed.output
    with memory.open("/cagan/w.pt.state", "rb") as state:
        assert torch.load(state, weights_only=True)["step"] == 3
