"""Tables that compare runs: `cfrobust report` (run folders -> mean ± std over seeds) and the
demo's per-run summary.

A run folder holds config.json and, once training has finished, eval.json (see train.py). Runs
are put in one row when their configs agree on the `--by` fields (default: every field but the
seed and the bookkeeping ones below), and one table is made per dataset with its headline
figures. Unfinished runs are listed apart and never averaged in.

A column is named by a metric spec: `NAME` looks NAME up in the chosen split's figures, then in
the derived figures; `SPLIT:PATH` looks PATH up in SPLIT's figures, with `.` between nested
keys (`test:ood.gaussian.auroc`, `test:groups.landbird/water.accuracy`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from cfrobust.errors import UserError
from cfrobust.trainer.config import TrainConfig

REPORT_SCHEMA = "cfrobust.report/1"
EVAL_SCHEMA = "cfrobust.eval/1"
# Config fields that do not change what a run computes (or that tell seeds apart): never row keys.
NOT_GROUPED = ("seed", "out", "shards", "device", "workers", "resume", "overwrite", "save_every", "quiet", "tensorboard", "preset",
               "eval_batch")
# Fields that TrainConfig.describe() already spells out in the `method` column.
DESCRIBED = ("cf", "cf_loss", "cf_coeff", "f", "f_partner", "f_weight", "f_erode", "reg", "reg_measure", "reg_grad",
             "reg_coeff")

# Per dataset: (column name, metric specs tried in order). The paper's headline figures.
HEADLINE_COLUMNS = {
    "waterbirds": [
        ("accuracy", ["accuracy"]),
        ("worst_group_accuracy", ["worst_group_accuracy"]),
        ("weighted_mean_accuracy", ["weighted_mean_accuracy"]),
        ("orig_accuracy", ["orig_accuracy"]),
        ("flip_accuracy", ["flip_accuracy"]),
    ],
    # The original test images are the `original` split (the release's original/val); `val` is the
    # training archive's own validation images, never a test figure.
    "in9": [
        ("original:accuracy", ["original:accuracy"]),
        ("mixed_same:accuracy", ["mixed_same:accuracy"]),
        ("mixed_rand:accuracy", ["mixed_rand:accuracy"]),
        ("bg_gap", ["bg_gap"]),
    ],
    "cct": [
        ("cis_test:accuracy", ["cis_test:accuracy"]),
        ("trans_test:accuracy", ["trans_test:accuracy"]),
        ("cis_trans_gap", ["cis_trans_gap"]),
    ],
}
HEADLINE_COLUMNS["in9l"] = HEADLINE_COLUMNS["in9"]
GENERIC_COLUMNS = [(name, [name]) for name in ("accuracy", "worst_group_accuracy", "mean_group_accuracy")]


# --- reading run folders ---------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: dict  # normalised through TrainConfig: every field present
    evaluation: dict | None  # eval.json, when the run has finished
    unfinished: str = ""  # why the run does not count, "" when it does

    @property
    def dataset(self) -> str:
        return dataset_of(self.evaluation or {}, self.config)


def find_run_folders(paths) -> list[Path]:
    """The run folders (holding config.json) given, or found anywhere below the folders given."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such run folder")
        if (path / "config.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("config.json") if p.is_file())
        if not below:
            raise UserError(f"{path}: not a run folder and no run folders below it (no config.json)")
        found += below
    return list(dict.fromkeys(found))


def read_run(path: Path) -> Run:
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or not {"epochs", "arch", "cf"} <= set(config):
        raise UserError(f"{path / 'config.json'}: not a cfrobust run config (made by `cfrobust train`)")
    config = TrainConfig.from_dict(config).to_dict()
    epochs_done = len(read_metrics(path / "metrics.jsonl"))
    if not (path / "eval.json").is_file():
        return Run(path, config, None, f"no eval.json ({epochs_done}/{config['epochs']} epochs)")
    evaluation = read_json(path / "eval.json")
    if not isinstance(evaluation, dict) or evaluation.get("schema") != EVAL_SCHEMA:
        raise UserError(f"{path / 'eval.json'}: not a {EVAL_SCHEMA} document")
    if epochs_done < config["epochs"]:
        return Run(path, config, evaluation, f"{epochs_done}/{config['epochs']} epochs in metrics.jsonl")
    return Run(path, config, evaluation)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def read_metrics(path: Path) -> list[dict]:
    """The per-epoch records of metrics.jsonl ([] when there is none)."""
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def dataset_of(evaluation: dict, config: dict) -> str:
    """The dataset a run was trained on: eval.json's `dataset`, else the shards' manifest, else a
    guess from the split names ("other" when nothing tells)."""
    if evaluation.get("dataset"):
        return evaluation["dataset"]
    if config.get("shards"):
        try:
            return json.loads((Path(config["shards"]) / "train" / "_info.json").read_text())["source"]["dataset"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # shards moved or made elsewhere: fall back on the split names
    splits = evaluation.get("splits", {})
    if "mixed_rand" in splits:
        return "in9"
    if "trans_test" in splits:
        return "cct"
    return "other"


# --- metric lookup ---------------------------------------------------------------------------


def lookup(evaluation: dict, spec: str, split: str) -> float | None:
    """The number `spec` names in an eval document (see the module docstring), or None."""
    splits = evaluation.get("splits", {})
    if ":" in spec:
        split_name, path = spec.split(":", 1)
        return nested_number(splits.get(split_name, {}), path)
    value = nested_number(splits.get(split, {}), spec)
    return value if value is not None else nested_number(evaluation.get("derived", {}), spec)


def nested_number(tree, path: str) -> float | None:
    """tree[k1][k2]... for path "k1.k2..."; keys may themselves hold dots (the longest matching
    key wins). None unless it ends on a number."""
    if not isinstance(tree, dict):
        return None
    if path in tree:
        value = tree[path]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    for key in sorted(tree, key=len, reverse=True):
        if path.startswith(f"{key}."):
            value = nested_number(tree[key], path[len(key) + 1 :])
            if value is not None:
                return value
    return None


def summarize(values: list[float]) -> dict:
    """mean, sample standard deviation (ddof=1; None for a single value) and count."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


# --- building the report ---------------------------------------------------------------------


def build_report(paths, by: list[str] | None = None, split: str = "test", metrics: list[str] | None = None) -> dict:
    """The report as a JSON-able dict: one table per dataset, one row per configuration."""
    fields = TrainConfig().to_dict()
    unknown = [f for f in by or [] if f not in fields]
    if unknown:
        raise UserError(f"--by {unknown[0]!r}: not a config field (fields: {', '.join(fields)})")
    runs = [read_run(p) for p in find_run_folders(paths)]
    finished = [r for r in runs if not r.unfinished]
    keys = list(by) if by else [f for f in fields if f not in NOT_GROUPED]
    tables = []
    for dataset in dict.fromkeys(r.dataset for r in finished):
        members = [r for r in finished if r.dataset == dataset]
        columns = [(m, [m]) for m in metrics] if metrics else HEADLINE_COLUMNS.get(dataset, GENERIC_COLUMNS)
        tables.append(build_table(dataset, members, keys, columns, split, show_method=not by))
    check_found(tables, metrics, split)
    return {
        "schema": REPORT_SCHEMA,
        "split": split,
        "by": keys,
        "tables": tables,
        "not_finished": [{"run": str(r.path), "reason": r.unfinished} for r in runs if r.unfinished],
    }


# The figures of an eval.json split and its `derived` block (README, `cfrobust eval`).
FIGURES = ("n", "accuracy", "loss", "ece", "auroc", "aupr", "groups", "worst_group_accuracy", "mean_group_accuracy",
           "saliency_focus", "saliency_focus_n", "ood", "weighted_mean_accuracy", "orig_accuracy", "flip_accuracy",
           "bg_gap", "cis_trans_gap")


def check_found(tables: list[dict], metrics: list[str] | None, split: str) -> None:
    """A figure name that eval.json never has is a typo, and so is a split where no finished
    run has any figure: both are named instead of printing columns of '-'."""
    for spec in metrics or []:
        head = spec.split(":", 1)[-1].split(".", 1)[0]
        if head not in FIGURES:
            raise UserError(f"--metrics {spec!r}: {head!r} is not a figure of eval.json (figures: {', '.join(FIGURES)})")
    rows = [row for table in tables for row in table["rows"]]
    if rows and all(summary["mean"] is None for row in rows for summary in row["metrics"].values()):
        raise UserError(f"--split {split!r}: no finished run has any of these figures there")


def build_table(dataset: str, runs: list[Run], keys: list[str], columns, split: str, show_method: bool) -> dict:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(json.dumps(run.config[k]) for k in keys), []).append(run)
    configs = [{k: members[0].config[k] for k in keys} for members in groups.values()]
    if show_method:
        # The method column, plus any other grouped field that differs between the rows.
        varying = [k for k in keys if k not in DESCRIBED and len({json.dumps(c[k]) for c in configs}) > 1]
        labels = [{"method": TrainConfig.from_dict(c).describe(), **{k: c[k] for k in varying}} for c in configs]
    else:
        labels = configs
    rows = []
    for label, config, members in zip(labels, configs, groups.values()):
        rows.append({
            "label": label,
            "config": config,
            "runs": [str(r.path) for r in members],
            "seeds": [r.config["seed"] for r in members],
            "metrics": {
                name: summarize([first_number(r.evaluation, specs, split) for r in members]) for name, specs in columns
            },
        })
    return {"dataset": dataset, "label_columns": list(labels[0]) if labels else [], "columns": [n for n, _ in columns], "rows": rows}


def first_number(evaluation: dict, specs: list[str], split: str) -> float | None:
    for spec in specs:
        value = lookup(evaluation, spec, split)
        if value is not None:
            return value
    return None


# --- rendering -------------------------------------------------------------------------------


def render(report: dict, fmt: str) -> str:
    return {"md": render_markdown, "csv": render_csv, "json": render_json}[fmt](report)


def render_json(report: dict) -> str:
    return json.dumps(report, indent=1) + "\n"


def cell(summary: dict, digits: int = 3) -> str:
    """'0.912 ± 0.013'; a single run shows its value alone; '-' when there is none."""
    if summary["mean"] is None:
        return "-"
    if summary["std"] is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def render_markdown(report: dict) -> str:
    lines = ["# cfrobust report", ""]
    lines.append(f"Mean ± sample std (ddof=1) over the runs of each configuration; split `{report['split']}` "
                 "for figures without a `split:` prefix; accuracies as fractions.")
    for table in report["tables"]:
        header = table["label_columns"] + ["runs", "seeds"] + table["columns"]
        lines += ["", f"## {table['dataset']}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in table["rows"]:
            cells = [_text(v) for v in row["label"].values()] + [str(len(row["runs"])), ",".join(map(str, row["seeds"]))]
            cells += [cell(row["metrics"][c]) for c in table["columns"]]
            lines.append("| " + " | ".join(cells) + " |")
    if report["not_finished"]:
        lines += ["", "## not finished", "", "Listed only; not in the tables above.", ""]
        lines += [f"- {r['run']}: {r['reason']}" for r in report["not_finished"]]
    if not report["tables"]:
        lines += ["", "No finished runs."]
    return "\n".join(lines) + "\n"


def render_csv(report: dict) -> str:
    """One line per configuration (dataset, its label fields, runs, seeds, then <metric> and
    <metric>_std per column), then one line per unfinished run with its reason in `status`."""
    label_columns = list(dict.fromkeys(c for t in report["tables"] for c in t["label_columns"]))
    metric_columns = list(dict.fromkeys(c for t in report["tables"] for c in t["columns"]))
    header = ["status", "dataset"] + label_columns + ["runs", "seeds"]
    header += [name for c in metric_columns for name in (c, f"{c}_std")]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for table in report["tables"]:
        for row in table["rows"]:
            line = {"status": "finished", "dataset": table["dataset"], "runs": len(row["runs"])}
            line["seeds"] = " ".join(map(str, row["seeds"]))
            line.update({k: _text(v) for k, v in row["label"].items()})
            for name, summary in row["metrics"].items():
                line[name], line[f"{name}_std"] = _number(summary["mean"]), _number(summary["std"])
            writer.writerow(line)
    for run in report["not_finished"]:
        writer.writerow({"status": f"not finished: {run['reason']}", "runs": run["run"]})
    return out.getvalue()


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, list, dict)) or value is None else str(value)


def _number(value) -> str:
    return "" if value is None else repr(value)


# --- the demo's summary (one row per run, no seeds) ------------------------------------------


def summary_markdown(documents: dict[str, dict], split: str = "test") -> str:
    """One row per run: accuracy, worst-group accuracy and each group's accuracy on `split`."""
    groups = sorted({g for doc in documents.values() for g in doc["splits"][split]["groups"]})
    header = ["run", "method", "accuracy", "worst-group"] + groups
    lines = [f"Results on the {split} split (accuracy as a fraction; groups are label/background).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name, doc in documents.items():
        figures = doc["splits"][split]
        row = [name, TrainConfig.from_dict(doc["config"]).describe(), f"{figures['accuracy']:.3f}", f"{figures['worst_group_accuracy']:.3f}"]
        row += [f"{figures['groups'][g]['accuracy']:.3f}" if g in figures["groups"] else "-" for g in groups]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
