"""`cfrobust report` on run folders written by the tests: exact means and sample stds, unfinished
runs listed apart, markdown / csv / json outputs, one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from click.testing import CliRunner

from cfrobust.cli.main import cli
from cfrobust.trainer.config import TrainConfig
from cfrobust.trainer.report import build_report, nested_number

METHOD = {"cf": "tile", "f": "mrand", "reg": "bbox_o", "reg_coeff": 10.0}


def write_run(folder, seed, method=None, epochs=3, epochs_done=3, test=None, derived=None, other_splits=None, dataset="waterbirds"):
    """A run folder as `cfrobust train` leaves it; no eval.json when `test` is None."""
    folder.mkdir(parents=True)
    config = TrainConfig(shards="", out=str(folder), arch="simple-cnn", epochs=epochs, seed=seed, **(method or {}))
    config = config.with_factual_pairing(2)  # train records the pairing it took for the shards' two classes
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1}) + "\n" for e in range(epochs_done)))
    if test is not None:
        document = {"schema": "cfrobust.eval/1", "config": config.to_dict(), "derived": derived or {}, "splits": {"test": test, **(other_splits or {})}}
        if dataset:
            document["dataset"] = dataset
        (folder / "eval.json").write_text(json.dumps(document))
    return folder


def figures(accuracy, worst, groups=None, **more):
    return {"n": 100, "accuracy": accuracy, "worst_group_accuracy": worst, "mean_group_accuracy": (accuracy + worst) / 2,
            "groups": groups or {}, **more}


@pytest.fixture
def runs(tmp_path):
    """Three ERM seeds, one method seed, a run without eval.json and a run cut short."""
    root = tmp_path / "runs"
    for seed, acc, worst, wma in [(0, 0.80, 0.5, 0.70), (1, 0.90, 0.6, 0.75), (2, 0.85, 0.7, 0.95)]:
        groups = {"landbird/water": {"n": 10, "accuracy": worst}}
        ood = {"gaussian": {"n": 100, "fpr_at_95_tpr": 0.1 * seed, "auroc": 0.9, "aupr": 0.8}}
        write_run(root / f"erm-s{seed}", seed, test=figures(acc, worst, groups, ood=ood), derived={"weighted_mean_accuracy": wma},
                  other_splits={"val": figures(0.5 + 0.1 * seed, 0.4)})
    write_run(root / "method-s0", 0, METHOD, test=figures(0.9, 0.8), derived={"weighted_mean_accuracy": 0.88})
    write_run(root / "method-s1", 1, METHOD, epochs_done=1)  # still training: no eval.json
    write_run(root / "method-s2", 2, METHOD, epochs_done=2, test=figures(0.123, 0.0))  # an eval.json of a cut-short run
    return root


def test_markdown_averages_seeds_and_lists_unfinished_runs_apart(runs):
    result = CliRunner().invoke(cli, ["report", str(runs), "--out", "-"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = "| method | runs | seeds | accuracy | worst_group_accuracy | weighted_mean_accuracy | orig_accuracy | flip_accuracy |"
    assert lines[lines.index("## waterbirds") + 2] == header
    # accuracy 0.80, 0.90, 0.85: mean 0.85, sample std sqrt((0.05² + 0.05² + 0) / 2) = 0.05;
    # worst 0.5, 0.6, 0.7: 0.6 ± 0.1; weighted 0.70, 0.75, 0.95: 0.8 ± sqrt(0.0175) = 0.1323.
    assert "| ERM | 3 | 0,1,2 | 0.850 ± 0.050 | 0.600 ± 0.100 | 0.800 ± 0.132 | - | - |" in lines
    assert "| CF(tile, uni, 0.5) + F(mrand, any, replace, blend edge) + Sal(bbox_o, grad_y, λ=10) | 1 | 0 | 0.900 | 0.800 | 0.880 | - | - |" in lines
    unfinished = lines[lines.index("## not finished") :]
    assert f"- {runs / 'method-s1'}: no eval.json (1/3 epochs)" in unfinished
    assert f"- {runs / 'method-s2'}: 2/3 epochs in metrics.jsonl" in unfinished
    assert "0.123" not in result.output  # the cut-short run's figures are nowhere


def test_json_holds_exact_means_and_sample_stds(runs, tmp_path):
    out = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["report", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"2 configuration(s), 2 unfinished run(s); written to {out}"
    report = json.loads(out.read_text())
    assert report["schema"] == "cfrobust.report/1" and report["split"] == "test"
    (table,) = report["tables"]
    erm, method = table["rows"]
    assert erm["label"] == {"method": "ERM"} and erm["seeds"] == [0, 1, 2]
    assert erm["metrics"]["accuracy"] == {"mean": pytest.approx(0.85), "std": pytest.approx(0.05), "n": 3, "values": [0.8, 0.9, 0.85]}
    assert erm["metrics"]["weighted_mean_accuracy"]["std"] == pytest.approx(math.sqrt(0.0175))
    assert method["metrics"]["accuracy"] == {"mean": 0.9, "std": None, "n": 1, "values": [0.9]}
    assert erm["metrics"]["orig_accuracy"] == {"mean": None, "std": None, "n": 0, "values": []}
    assert [r["reason"] for r in report["not_finished"]] == ["no eval.json (1/3 epochs)", "2/3 epochs in metrics.jsonl"]


def test_csv_has_a_mean_and_a_std_column_per_metric(runs, tmp_path):
    out = tmp_path / "report.csv"
    assert CliRunner().invoke(cli, ["report", str(runs), "--out", str(out)]).exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0])[:6] == ["status", "dataset", "method", "runs", "seeds", "accuracy"]
    assert rows[0]["method"] == "ERM" and rows[0]["runs"] == "3" and rows[0]["seeds"] == "0 1 2"
    assert float(rows[0]["accuracy"]) == pytest.approx(0.85) and float(rows[0]["accuracy_std"]) == pytest.approx(0.05)
    assert rows[1]["accuracy"] == "0.9" and rows[1]["accuracy_std"] == ""
    assert [r["status"] for r in rows[2:]] == ["not finished: no eval.json (1/3 epochs)", "not finished: 2/3 epochs in metrics.jsonl"]
    assert rows[2]["runs"] == str(runs / "method-s1")


def test_by_fields_and_metric_specs_with_splits_and_nested_keys(runs):
    report = build_report(
        [runs / "erm-s0", runs / "erm-s1", runs / "erm-s2", runs / "method-s0"],
        by=["cf", "reg"],
        metrics=["val:accuracy", "test:ood.gaussian.fpr_at_95_tpr", "groups.landbird/water.accuracy", "aupr"],
    )
    (table,) = report["tables"]
    assert table["label_columns"] == ["cf", "reg"] and report["by"] == ["cf", "reg"]
    erm, method = table["rows"]
    assert erm["label"] == {"cf": "none", "reg": "none"} and method["label"] == {"cf": "tile", "reg": "bbox_o"}
    assert erm["metrics"]["val:accuracy"]["mean"] == pytest.approx(0.6)  # 0.5, 0.6, 0.7
    assert erm["metrics"]["test:ood.gaussian.fpr_at_95_tpr"]["values"] == pytest.approx([0.0, 0.1, 0.2])
    assert erm["metrics"]["groups.landbird/water.accuracy"]["mean"] == pytest.approx(0.6)
    assert erm["metrics"]["aupr"]["n"] == 0  # not in these eval documents: shown as '-'
    assert report["not_finished"] == []


def test_the_default_rows_split_on_any_other_field_and_show_it(runs):
    write_run(runs / "erm-lr", 0, {"lr": 0.5}, test=figures(0.5, 0.5))
    (table,) = build_report([runs])["tables"]
    assert table["label_columns"] == ["method", "lr"]  # rows in the order of their first run's path
    assert [(r["label"]["method"], r["label"]["lr"], len(r["runs"])) for r in table["rows"]] == [
        ("ERM", 0.5, 1), ("ERM", 0.02, 3), ("CF(tile, uni, 0.5) + F(mrand, any, replace, blend edge) + Sal(bbox_o, grad_y, λ=10)", 0.02, 1)
    ]


def test_in9_and_cct_headline_columns(tmp_path):
    # `val` (the training archive's validation images) must not stand in for the original test set.
    in9 = {"val": figures(0.3, 0.3), "original": figures(0.9, 0.8), "mixed_same": figures(0.8, 0.7), "mixed_rand": figures(0.6, 0.5)}
    write_run(tmp_path / "in9", 0, test=None)
    (tmp_path / "in9" / "eval.json").write_text(json.dumps({"schema": "cfrobust.eval/1", "splits": in9, "derived": {"bg_gap": 0.2}}))
    cct = {"cis_test": figures(0.7, 0.1), "trans_test": figures(0.5, 0.1)}
    write_run(tmp_path / "cct", 0, test=figures(0.0, 0.0), other_splits=cct, derived={"cis_trans_gap": 0.2}, dataset="cct")
    tables = {t["dataset"]: t for t in build_report([tmp_path])["tables"]}
    assert tables["in9"]["columns"] == ["original:accuracy", "mixed_same:accuracy", "mixed_rand:accuracy", "bg_gap"]
    assert [tables["in9"]["rows"][0]["metrics"][c]["mean"] for c in tables["in9"]["columns"]] == [0.9, 0.8, 0.6, 0.2]
    assert tables["cct"]["columns"] == ["cis_test:accuracy", "trans_test:accuracy", "cis_trans_gap"]
    assert [tables["cct"]["rows"][0]["metrics"][c]["mean"] for c in tables["cct"]["columns"]] == [0.7, 0.5, 0.2]


def test_other_datasets_get_accuracy_worst_and_mean_group(tmp_path):
    write_run(tmp_path / "r", 0, test=figures(0.9, 0.7), dataset="synthetic")
    (table,) = build_report([tmp_path / "r"])["tables"]
    assert table["columns"] == ["accuracy", "worst_group_accuracy", "mean_group_accuracy"]
    assert table["rows"][0]["metrics"]["mean_group_accuracy"]["mean"] == pytest.approx(0.8)


def test_nested_number_prefers_the_longest_key_and_wants_a_number():
    tree = {"groups": {"a.b": {"accuracy": 0.5}, "a": {"b.accuracy": 0.25}}, "flag": True}
    assert nested_number(tree, "groups.a.b.accuracy") == 0.5
    assert nested_number(tree, "groups") is None and nested_number(tree, "flag") is None
    assert nested_number(tree, "missing.key") is None


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["nowhere", "--out", "-"], "nowhere: no such run folder"),
        ("empty", ["empty", "--out", "-"], "empty: not a run folder and no run folders below it (no config.json)"),
        ("garbage", ["bad", "--out", "-"], "bad/config.json: unreadable (JSONDecodeError: "),
        ("foreign", ["bad", "--out", "-"], "bad/config.json: not a cfrobust run config (made by `cfrobust train`)"),
        ("foreign_eval", ["bad", "--out", "-"], "bad/eval.json: not a cfrobust.eval/1 document"),
        ("run", ["bad", "--by", "colour", "--out", "-"], "--by 'colour': not a config field (fields: shards, cache_dir, out, "),
        ("run", ["bad", "--out", "table.txt"], "--out table.txt: unknown extension '.txt'; use .md, .csv or .json, or pass --format"),
        ("other_run", ["bad", "--out", "other/eval.json"], "--out other/eval.json is a file of the run in other; choose another --out"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup == "garbage":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text("{not json")
    elif setup == "foreign":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"model": "bert"}))
    elif setup in ("foreign_eval", "run", "other_run"):
        write_run(tmp_path / "bad", 0, test=figures(0.5, 0.5))
        if setup == "foreign_eval":
            (tmp_path / "bad" / "eval.json").write_text(json.dumps({"schema": "other/1"}))
        if setup == "other_run":  # a run not among those reported
            write_run(tmp_path / "other", 1, test=figures(0.5, 0.5))
    result = CliRunner().invoke(cli, ["report", *args])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: {message}")


def test_an_unknown_figure_or_a_split_without_figures_is_named(runs):
    from cfrobust.errors import UserError

    with pytest.raises(UserError, match=r"^--metrics 'val:acuracy': 'acuracy' is not a figure of eval.json \(figures: n, "):
        build_report([runs], metrics=["accuracy", "val:acuracy"])
    with pytest.raises(UserError, match=r"^--split 'nosplit': no finished run has any of these figures there$"):
        build_report([runs], split="nosplit", metrics=["accuracy", "worst_group_accuracy"])
    assert build_report([runs], metrics=["accuracy", "aupr"])["tables"][0]["rows"][0]["metrics"]["aupr"]["n"] == 0  # shown as "-"
