"""Standard output carries nestrnn's results only; what plugin code prints goes to standard error.

``nestrnn plugins --json`` must print JSON a program can parse, ``nestrnn sample ... > out.txt``
the generated text and nothing else. Plugin code (a module's top level, a hook, a task's methods)
may print anything, with ``print``, through ``sys.stdout``, or at the file-descriptor level
(``os.write(1, ...)``, C code, a subprocess it starts). :func:`stdout_to_stderr` sends all of it to
standard error while such code runs; nestrnn prints its results after, to the real standard output.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

STDOUT_FD = 1
STDERR_FD = 2


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Meanwhile, what is written to standard output (``sys.stdout`` or file descriptor 1) goes to
    standard error. Nested uses are fine; where either descriptor is closed, ``sys.stdout`` alone
    is redirected."""
    _flush(sys.stdout)  # what was printed before goes where it was meant to, first
    saved = _point_stdout_fd_at_stderr()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush(sys.stdout)
        _flush(sys.stderr)
        if saved is not None:
            os.dup2(saved, STDOUT_FD)
            os.close(saved)


def _point_stdout_fd_at_stderr() -> int | None:
    """Make descriptor 1 a copy of descriptor 2; a copy of the old descriptor 1 to restore it."""
    try:
        saved = os.dup(STDOUT_FD)
    except OSError:  # no standard output at all: nothing to protect
        return None
    try:
        os.dup2(STDERR_FD, STDOUT_FD)
    except OSError:  # no standard error: leave descriptor 1 alone
        os.close(saved)
        return None
    return saved


def _flush(stream: Any) -> None:
    # a closed stream or a reader that went away shows when the result is printed, not here
    with contextlib.suppress(OSError, ValueError, AttributeError):
        stream.flush()
