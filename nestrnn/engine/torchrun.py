"""``python -m nestrnn.engine.torchrun ARGS``: torchrun (``python -m torch.distributed.run``),
ending the way a ``nestrnn`` command ends.

torchrun itself answers a SIGTERM or SIGINT (after passing it to its workers and waiting for them)
with a ``SignalException`` traceback, and a failed worker with a ``ChildFailedError`` traceback on
top of what the worker printed. Here the first exits quietly with status 128 + the signal number,
and the second with the first failed worker's status (2 after a one-line user error). A signal
that lands inside torch's own bookkeeping can come out as another exception raised while handling
the ``SignalException`` (its ``__context__``); that is the same stop.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from nestrnn.engine.stopping import exit_status


def main(argv: list[str]) -> int:
    try:
        torchrun_main(argv)
    except ChildFailedError as failed:
        _, failure = failed.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else exit_status(-failure.exitcode)
    except Exception as error:
        stop = _signal_behind(error)
        if stop is None:
            raise
        return exit_status(stop.sigval)
    return 0


def _signal_behind(error: BaseException | None) -> SignalException | None:
    """The ``SignalException`` that ``error`` is, or was raised while handling; None if none."""
    while error is not None and not isinstance(error, SignalException):
        error = error.__context__
    return error


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
