"""The one kind of error a user causes: the CLI prints it as one line and exits with status 2.

:class:`UserError` is the base of every error that a person, not a bug, is responsible for: a bad
configuration (:class:`nestrnn.config.ConfigError`), missing or corrupt data
(:class:`nestrnn.data_utils.DataError`), an unreadable checkpoint or a busy run directory
(:mod:`nestrnn.engine.rundir`), a bad command-line value. ``nestrnn.cli.main`` catches it in one
place; anything else that escapes is a bug and shows its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave or must fix; the message says what is wrong and what to do."""


def one_line(text: object) -> str:
    """A (possibly multi-line) message as one line."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())
