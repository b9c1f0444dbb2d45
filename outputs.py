"""Where a command writes: the checks that keep it from replacing what it must not.

A command's output folder is replaced (--overwrite) only when it holds nothing but what that
command writes there, and never when one of the command's inputs lies inside it; an output file
is never one of the command's inputs, and neither is a folder where a file is due.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cfrobust.errors import UserError


def check_output_folder(out: Path, option: str = "--out") -> None:
    """`out` may be created or filled: it is missing or a folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: a file, not a folder; choose another {option}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{option} {out}: {parent} is a file, not a folder")


def check_replaceable(out: Path, own_names: set[str], inputs: list[Path], option: str = "--out") -> None:
    """--overwrite may delete `out`: everything in it is among `own_names` (what the command
    writes there) and none of `inputs` lies inside it."""
    if not out.is_dir():
        return
    for source in inputs:
        if _inside(Path(source), out):
            raise UserError(f"{option} {out} holds the input {source}: --overwrite would delete it; choose another {option}")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own_names)
    if foreign:
        raise UserError(
            f"{option} {out} holds {foreign[0]!r}, which this command did not write: --overwrite replaces only "
            f"its own output; choose another {option}"
        )


def remove_folder(out: Path, option: str = "--out") -> None:
    """Delete `out` for --overwrite, once check_replaceable has passed. A symbolic link is
    refused rather than deleted through: the folder it names may be shared."""
    if out.is_symlink():
        raise UserError(f"{option} {out} is a symbolic link; --overwrite replaces only a real folder: "
                        f"give the folder it names ({out.resolve()}) or another {option}")
    shutil.rmtree(out)


def claim_output_folder(out: Path, own_names: set[str], overwrite: bool, refusal: str) -> None:
    """Ready `out` for a command that fills it from scratch: missing or empty is fine; with
    `overwrite`, an earlier output of the same command (only `own_names` in it) is deleted;
    otherwise a non-empty folder stops the command with `refusal`."""
    check_output_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(refusal)
        check_replaceable(out, own_names, [])
        remove_folder(out)


def check_output_file(path: Path, inputs: list[Path], option: str = "--out") -> None:
    """`path` may be written: not a folder, not one of the command's inputs, in a folder that
    exists or can be made."""
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder; give a file name")
    for source in inputs:
        if path.exists() and Path(source).exists() and path.resolve() == Path(source).resolve():
            raise UserError(f"{option} {path} is this command's input; choose another {option}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{option} {path}: {parent} is a file, not a folder")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
