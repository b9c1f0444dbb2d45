"""`cfrobust fetch`: download a public dataset (resumable, checksummed, unpacked)."""

from __future__ import annotations

from pathlib import Path

import click

FETCHABLE = ("waterbirds", "in9", "cct")


@click.command(context_settings={"max_content_width": 100})
@click.argument("dataset", type=click.Choice(FETCHABLE))
@click.option("--to", "--out", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to download and unpack into (--out is the same option, as in the other commands).")
def fetch(dataset, to) -> None:
    """Download DATASET from its public home into TO, resuming partial downloads, checking
    sha256 digests and unpacking the archives. Without network access, it says which file to
    download by hand; run it again afterwards to verify and unpack."""
    from cfrobust.datasets.fetch import fetch as run_fetch

    files = run_fetch(dataset, to, report=click.echo)
    click.echo(f"{len(files)} file(s) ready in {to}")
