"""The one exception type for problems the user can fix (bad input, missing files).

The CLI prints these as a single line without a traceback; everything else is a bug.
"""

import re


class UserError(Exception):
    """Bad input: the message names the file, record or option at fault."""


def user_message(error: UserError) -> str:
    """The message to show. A UserError raised in a DataLoader worker reaches the main process
    re-raised with the worker's whole traceback as its text; its own message is the last line."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return re.sub(r"^cfrobust\.[\w.]+: ", "", last)  # UserError or a subclass of it, by its qualified name
