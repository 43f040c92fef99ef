"""One writer per directory: an advisory ``flock`` on a lock file that names its holder.

The operating system releases the lock when the holding process ends, however it ends (a
``kill -9`` included), so a lock is never stale; the pid written into the file is only there to
name the holder in the error that a second process gets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from nestrnn.engine.runfiles import open_regular
from nestrnn.errors import UserError


class LockError(UserError):
    """The lock is held by another process, or its file cannot be opened for writing."""


def _lock_or_name_holder(fd: int, what: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        raise LockError(
            f"{what} is in use by another process (pid {holder}); wait for it to finish or stop "
            "it first"
        ) from None


class DirectoryLock:
    """A held lock; :meth:`acquire` takes it, :meth:`release` (or the end of a ``with`` block, or
    of the process) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, what: str) -> DirectoryLock:
        """Take the lock at ``path`` without waiting; LockError names the holder's pid.

        ``what`` names the locked thing in errors ("the run directory runs/x")."""
        try:  # never through a link: the pid would be written into the file it points to
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, LockError)
        except OSError as error:
            raise LockError(f"cannot lock {what}: {error.strerror or error}") from None
        try:
            _lock_or_name_holder(fd, what)
        except LockError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @staticmethod
    def check_free(path: Path, what: str) -> None:
        """LockError naming the holder when another process holds the lock at ``path``; writes
        nothing (an early check: only :meth:`acquire` makes a process the writer)."""
        try:
            fd = open_regular(path, os.O_RDONLY, LockError)
        except FileNotFoundError:  # no lock file yet: nobody holds it
            return
        except OSError as error:
            raise LockError(f"cannot lock {what}: {error.strerror or error}") from None
        try:
            _lock_or_name_holder(fd, what)
        finally:
            os.close(fd)  # and with it the lock, when it was taken

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
