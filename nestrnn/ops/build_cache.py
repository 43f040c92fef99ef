"""The cache of compiled libraries (the CPU kernel, the outer LSTM's step nodes): where it is, how a
build gets into it, which files in it may be loaded, and loading each library once per process
(``LoadOnce``, with the ``NativeStatus`` that says whether it is in use and why not).

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
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

__all__ = [
    "LoadOnce",
    "NativeStatus",
    "cache_dir",
    "compile_into",
    "open_or_build",
    "trusted_descriptor",
    "user_suffix",
]

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


@dataclass(frozen=True)
class NativeStatus:
    """Whether a library is in use: ``library`` is its path, else ``reason`` says why not."""

    available: bool
    reason: str
    library: Path | None = None


class LoadOnce(Generic[Loaded]):
    """A library of the cache, loaded (or found unavailable) once per process, on first call.

    ``load()`` gives the loaded library and its status; ``switch`` names the environment variable
    whose value ``0`` turns it off. Unless it is off, an unavailable library warns once, naming
    it (``name``) and saying what runs instead (``fallback``).
    """

    def __init__(
        self,
        load: Callable[[], tuple[Loaded | None, NativeStatus]],
        switch: str,
        name: str,
        fallback: str,
    ):
        self._load, self._switch, self._name, self._fallback = load, switch, name, fallback
        self._lock = threading.Lock()
        self._state: tuple[Loaded | None, NativeStatus] | None = None

    def __call__(self) -> tuple[Loaded | None, NativeStatus]:
        with self._lock:
            if self._state is None:
                off = os.environ.get(self._switch) == "0"
                reason = f"disabled by {self._switch}=0"
                self._state = (None, NativeStatus(False, reason)) if off else self._load()
                if not self._state[1].available and not off:
                    warnings.warn(
                        f"nestrnn: {self._name} not available ({self._state[1].reason}); "
                        f"{self._fallback}",
                        RuntimeWarning,
                        stacklevel=4,  # past this call and kernel() or module()
                    )
            return self._state
