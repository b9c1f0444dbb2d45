"""`cfrobust shards verify|merge`: check shards against their manifests, or combine the partial
manifests that several preprocessing processes wrote into each split's `_info.json`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cfrobust.cli.options import UserErrorGroup


@click.group(
    cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
def shards() -> None:
    """Check or combine shard folders (OUT/<split>/ with _info.json)."""


@shards.command(short_help="Check shards against their manifests.")
@click.argument("directory", metavar="DIR")
def verify(directory: str) -> None:
    """Check every shard of DIR (a shard root or one split folder, local or a URL) against its
    manifest: file present, sha256, complete tar, sample count, required parts, unique keys.

    Leftover *.tmp files and unlisted .tar files are reported as warnings; exit status 1 means
    at least one problem."""
    from cfrobust.shards.manifest import read_info
    from cfrobust.shards.remote import location
    from cfrobust.shards.verify import stray_files, unlisted_splits, verify_dirs, verify_split

    directory = location(directory)  # a Path, or a URL
    unlisted = unlisted_splits(directory)
    for problem in unlisted:
        click.echo(problem)
    failed = len(unlisted)
    for split_dir in verify_dirs(directory):
        for warning in stray_files(split_dir):
            click.echo(f"warning: {warning}")
        problems = verify_split(split_dir, progress=sys.stdout.isatty())
        for problem in problems:
            click.echo(problem)
        failed += len(problems)
        if not problems:
            info = read_info(split_dir)
            click.echo(f"{split_dir.name}: OK, {len(info['shards'])} shards, {info['num_samples']} samples")
    if failed:
        raise click.ClickException(f"{failed} problem{'s' if failed > 1 else ''} in {directory}")


@shards.command(short_help="Write _info.json from the partial manifests of a multi-process run.")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
def merge(directory: Path) -> None:
    """Write _info.json for DIR (a shard root or one split folder) from the partial
    manifests _info.rNNN-of-NNN.json of a multi-process preprocess; the parts are kept."""
    from cfrobust.shards.verify import merge_dirs, merge_parts, part_files

    for split_dir in merge_dirs(directory):
        parts = len(part_files(split_dir))
        info = merge_parts(split_dir)
        click.echo(f"{split_dir.name}: merged {parts} parts, {len(info['shards'])} shards, "
                   f"{info['num_samples']} samples")
