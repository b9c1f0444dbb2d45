"""Turn a config dataclass into click options, so each option is declared once (in the dataclass)."""

from __future__ import annotations

import errno
from dataclasses import MISSING, fields

import click

from cfrobust.errors import UserError, user_message


def dataclass_options(cls, required: tuple[str, ...] = ()):
    """Decorator adding one `--field-name` option per dataclass field, with its help and choices."""

    def decorate(command):
        for field in reversed(fields(cls)):
            flag = "--" + field.name.replace("_", "-")
            meta = field.metadata
            default = None if field.default is MISSING else field.default
            if isinstance(default, bool):  # --x/--no-x: a preset's True can be turned off
                option = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=default, help=meta.get("help"))
            else:
                choices = meta.get("choices")
                option = click.option(
                    flag,
                    field.name,
                    type=click.Choice(choices) if choices else type(default),
                    default=None if field.name in required else default,
                    required=field.name in required,
                    show_default=field.name not in required,
                    help=meta.get("help"),
                )
            command = option(command)
        return command

    return decorate


def comma_list(text: str) -> list[str]:
    """'tile, mean' -> ['tile', 'mean']; 'none' or '' -> []."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [] if items == ["none"] else items


class UserErrorGroup(click.Group):
    """A command group that turns UserError (bad input, the user's to fix) into one line,
    no traceback. The top-level group is one; so are the sub-groups, which keeps them right
    when they are invoked on their own (tests, other entry points)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(user_message(exc)) from None
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRORS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror}") from None


# OS errors about the machine rather than the program (a full or read-only disk, permissions):
# the user fixes them, so they get one line naming the file, not a traceback.
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

