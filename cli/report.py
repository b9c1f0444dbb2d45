"""`cfrobust report`: run folders -> one table per dataset, mean ± std over seeds."""

from __future__ import annotations

import click

from cfrobust.cli.options import comma_list

FORMATS = {".md": "md", ".markdown": "md", ".csv": "csv", ".json": "json"}


@click.command(context_settings={"max_content_width": 100})
@click.argument("runs", nargs=-1, required=True)
@click.option(
    "--by", default="",
    help="Comma-separated config fields whose values make a row, e.g. cf,f,reg  "
    "[default: every field but seed and bookkeeping (out, shards, device, workers, ...)]",
)
@click.option("--split", default="test", show_default=True, help="Split of the figures named without a `split:` prefix.")
@click.option(
    "--metrics", default="",
    help="Comma-separated columns: a figure of --split or a derived one (accuracy, aupr, bg_gap), or "
    "SPLIT:PATH (mixed_rand:accuracy, test:ood.gaussian.auroc)  [default: the dataset's headline figures]",
)
@click.option("--out", default="-", show_default=True, help="FILE.md, FILE.csv or FILE.json; - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default=None,
              help="Output format  [default: from --out's extension; md for stdout]")
def report(runs, by, split, metrics, out, fmt) -> None:
    """Compare training runs: one row per configuration, mean ± sample std over its seeds.

    RUNS are run folders (made by `cfrobust train`) or folders above them. Runs without
    eval.json or with fewer epochs than configured are listed as not finished, never averaged.

    \b
      cfrobust report runs/ --out table.md
      cfrobust report runs/wb-* --by cf,f,reg --metrics accuracy,worst_group_accuracy --out -
    """
    from pathlib import Path

    from cfrobust.errors import UserError
    from cfrobust.outputs import check_output_file
    from cfrobust.trainer.report import build_report, render
    from cfrobust.trainer.config import RUN_FILES

    if fmt is None:
        suffix = "" if out == "-" else Path(out).suffix.lower()
        if out != "-" and suffix not in FORMATS:
            raise UserError(f"--out {out}: unknown extension {suffix or '(none)'!r}; use .md, .csv or .json, or pass --format")
        fmt = FORMATS.get(suffix, "md")
    if out != "-":  # never over a run's own files, reported or not
        check_output_file(Path(out), [p for run in runs for p in Path(run).rglob("*") if p.name in RUN_FILES])
        if Path(out).name in RUN_FILES and (Path(out).parent / "config.json").is_file():
            raise UserError(f"--out {out} is a file of the run in {Path(out).parent}; choose another --out")
    document = build_report(runs, comma_list(by) or None, split, comma_list(metrics) or None)
    text = render(document, fmt)
    if out == "-":
        click.echo(text, nl=False)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    rows = sum(len(t["rows"]) for t in document["tables"])
    click.echo(f"{rows} configuration(s), {len(document['not_finished'])} unfinished run(s); written to {out}")
