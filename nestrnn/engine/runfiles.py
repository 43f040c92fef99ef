"""Opening the files of a run without being tricked: never through a symbolic link, never a FIFO,
a device or a directory under a file's name.

A link named ``.lock`` or ``metrics.jsonl`` would make a run truncate or append to a file
somewhere else; a FIFO would make a reader wait forever. :func:`open_regular` opens with
``O_NOFOLLOW`` (the last component is never followed) and ``O_NONBLOCK`` (opening a FIFO does not
wait for a writer), then refuses anything that is not a regular file with a one-line error that
names the file. The folders above the file may be links (``runs -> /scratch/runs`` is common).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from nestrnn.errors import UserError

#: what a file's type is called in errors
_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def not_a_file(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a symbolic link", ...); None
    for a regular file or nothing at all. The link itself is looked at, never its target."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def refusal(path: Path, kind: str, error: type[UserError]) -> UserError:
    """The error for a run file that is ``kind`` instead of a regular file."""
    advice = (
        "the files of a run are never followed through links; put the file itself there"
        if kind == "a symbolic link"
        else "remove it or choose another run directory"
    )
    return error(f"{path} is {kind}, not a regular file; {advice}")


def check_regular(path: Path, error: type[UserError]) -> None:
    """``error`` when ``path`` exists and is not a regular file (before it is replaced)."""
    kind = not_a_file(path)
    if kind is not None:
        raise refusal(path, kind, error)


def open_regular(path: Path, flags: int, error: type[UserError], mode: int = 0o666) -> int:
    """``os.open(path, flags)`` of a regular file only, without following a link; the
    descriptor is blocking again once opened. OSErrors other than a refused kind of file
    propagate (the caller says whether it was reading or writing)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as failure:
        kind = not_a_file(path)
        if kind is not None or failure.errno == errno.ELOOP:
            raise refusal(path, kind or "a symbolic link", error) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refusal(path, _KINDS.get(stat.S_IFMT(info.st_mode), "not a file"), error)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path, error: type[UserError]) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); an OSError becomes
    ``error("cannot read PATH: ...")``."""
    try:
        fd = open_regular(path, os.O_RDONLY, error)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    except OSError as failure:
        raise error(f"cannot read {path}: {failure.strerror or failure}") from None
