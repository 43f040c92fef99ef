"""The cache of compiled libraries (the CPU kernel, the outer LSTM's step nodes): where it is, how a
build gets into it, and which files in it may be loaded.

The cache is ``$NESTRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/nestrnn``, else ``~/.cache/nestrnn``.
A build is compiled to a temporary file there and renamed into place, so a concurrent builder
never sees a partial file and a file planted under the name is replaced. A cached file is loaded
only when it is a regular file owned by the current user that nobody else may write, checked on
the open file itself, which is then the file loaded (``/proc/self/fd/N``): it cannot be swapped
between the check and the load.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["cache_dir", "compile_into", "open_or_build", "trusted_descriptor", "user_suffix"]

Loaded = TypeVar("Loaded")


def cache_dir() -> Path:
    if "NESTRNN_CACHE_DIR" in os.environ:
        return Path(os.environ["NESTRNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nestrnn"


def user_suffix() -> str:
    """Part of every cached name: a cache shared between users keeps one build per user."""
    return f"-u{os.getuid()}" if hasattr(os, "getuid") else ""


def trusted_descriptor(path: Path) -> int | None:
    """An open descriptor of ``path`` if it is ours (see the module docstring), else None. Load
    it as ``/proc/self/fd/N``; the caller closes it when the load fails."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    info = os.fstat(fd)
    owned = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    proc = Path(f"/proc/self/fd/{fd}")
    if not stat.S_ISREG(info.st_mode) or not owned or info.st_mode & 0o022 or not proc.exists():
        os.close(fd)
        return None
    return fd


def compile_into(target: Path, command: Callable[[str], list[str]], what: str) -> Path:
    """Run ``command(output_path)`` to build ``what`` into ``target``, atomically; raises
    ``RuntimeError`` saying why when the cache is not writable or the build fails."""
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=target.suffix, dir=cache)  # mode 0600: ours alone
        os.close(fd)
    except OSError as err:
        raise RuntimeError(f"cache directory {cache} is not writable: {err}") from err
    try:
        done = subprocess.run(command(tmp), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {what} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"compiling {what} failed: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def open_or_build(
    path: Path, open_trusted: Callable[[Path], Loaded | None], build: Callable[[Path], Path]
) -> Loaded:
    """``open_trusted(path)``, building ``path`` first when it is absent, planted or unusable;
    raises ``RuntimeError`` (or ``OSError``) saying why when neither works."""
    loaded = open_trusted(path) if path.exists() else None
    if loaded is None:
        build(path)
        loaded = open_trusted(path)
        if loaded is None:
            raise RuntimeError(f"{path} could not be loaded after building it")
    return loaded
