"""Stopping a run cleanly on SIGTERM (what schedulers send first), SIGINT (Ctrl-C) and SIGHUP (a
closed terminal or ssh session; torchrun passes it on to its workers as it is).

While a :class:`StopSignals` block is active, such a signal only records a request; the trainer
sees it at the end of the current optimizer step (or evaluation batch), saves ``last.pt`` and
stops; the process exits with 128 + the signal's number. More SIGTERMs (or SIGHUPs) change nothing (a scheduler may signal every process of a job, and torchrun then signals
its workers again); a second SIGINT acts at once, as Ctrl-C does (the checkpoint on disk stays
whole: it is written atomically).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

#: the signals that ask a run to stop at the next consistent point (no SIGHUP on Windows)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


def exit_status(signum: int) -> int:
    """The conventional exit status of a process stopped by signal ``signum`` (128 + number)."""
    return 128 + signum


class StopSignals:
    """Records the first of :data:`STOP_SIGNALS` received inside the ``with`` block (main thread
    only; elsewhere it records nothing and signals keep their handlers). A signal that was ignored
    when the block began stays ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts
            signal.signal(signum, self._previous.pop(signum))

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                # one the process was started to ignore stays ignored: nohup's SIGHUP, the
                # SIGINT of a shell script's background job
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()
