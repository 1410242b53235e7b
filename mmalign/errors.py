"""User-facing errors.

A ``UserError`` is bad input: a config key, a data row, a path or a model that does not fit the algorithm.
The CLI prints its one-line message and exits with code 2; anything else is an internal error (exit 1).
"""


class UserError(Exception):
    """Bad input the user can fix. The message is one line naming the key/file/row, the value and what is accepted."""
