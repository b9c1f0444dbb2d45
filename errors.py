"""The one exception type for problems the user can fix (bad input, missing files).

The CLI prints these as a single line without a traceback; everything else is a bug.
"""


class UserError(Exception):
    """Bad input: the message names the file, record or option at fault."""
