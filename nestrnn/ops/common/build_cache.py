"""The cache of compiled libraries (the CPU kernel, the outer LSTM's step nodes): where it is, how a
build gets into it, which files in it may be loaded, and loading each library once per process
(``LoadOnce``, with the ``NativeStatus`` that says whether it is in use and why not).

The cache is ``$NESTRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/nestrnn``, else ``~/.cache/nestrnn``.
A build is compiled to a temporary file there, sealed with a record of its size and sha256 at its
end, synced, and renamed into place (and the folder synced), so a concurrent builder never sees a
partial file, a crash never leaves a short one under the name, and a file planted there is
replaced. A cached file is loaded only when it is a regular file owned by the current user that
nobody else may write, and whole (its record matches it), checked on the open file itself, which
is then the file loaded (``/proc/self/fd/N``): it cannot be swapped between the check and the
load. It is opened without blocking and without following links, so a FIFO or a link planted
under the name is refused rather than waited on. A refused file (``Untrusted`` says why) is
replaced by a fresh build: a truncated library would otherwise kill the process that maps it
(SIGBUS), and one of an older version has no record.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from nestrnn.data_utils import fsync_directory

__all__ = [
    "LoadOnce",
    "NativeStatus",
    "Untrusted",
    "cache_dir",
    "compile_into",
    "compile_torch_library",
    "cxx_compiler",
    "open_or_build",
    "torch_build_key",
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


class Untrusted(Exception):
    """Why a file at a library's name in the cache is not loaded; the caller replaces it by a
    fresh build."""


# A library ends with this record of itself: magic, the size of what precedes it, its sha256.
# It is appended before the one rename that puts the library in place, so no library is ever
# without its record or beside another build's (as a separate record file could be when two
# processes build at once). The dynamic loader maps only what the ELF headers name, so the
# bytes after them are never read by it.
_SEAL = struct.Struct("<16sQ32s")
_SEAL_MAGIC = b"nestrnn-sealed-1"
_CHUNK = 1 << 20
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _open_own_file(path: str | Path, flags: int) -> int:
    """``path`` opened with ``flags`` if it is a regular file of this user that nobody else may
    write, checked on the descriptor; else raises ``Untrusted`` saying why.

    Opened without blocking and without following a symbolic link: a FIFO planted under the name
    would otherwise block ``open`` forever, and a link would point anywhere."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        link = err.errno == errno.ELOOP
        raise Untrusted(
            "it is a symbolic link" if link else f"it cannot be opened: {err}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "some other kind of file")
            raise Untrusted(f"it is {kind}, not a regular file")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise Untrusted(f"it belongs to user {info.st_uid}")
        if info.st_mode & 0o022:
            raise Untrusted(f"others may write it: mode {stat.S_IMODE(info.st_mode):o}")
    except BaseException:
        os.close(fd)
        raise
    return fd  # O_NONBLOCK is left set: it changes nothing for a regular file


def _digest(fd: int, size: int) -> bytes:
    """The sha256 of the first ``size`` bytes of ``fd``."""
    digest, offset = hashlib.sha256(), 0
    while offset < size and (block := os.pread(fd, min(_CHUNK, size - offset), offset)):
        digest.update(block)
        offset += len(block)
    return digest.digest()


def trusted_descriptor(path: Path) -> int:
    """An open descriptor of ``path`` if it is ours (see the module docstring) and whole: it ends
    with the record of its size and sha256 that ``compile_into`` wrote, and matches it. Else
    raises ``Untrusted`` saying why. Load it as ``/proc/self/fd/N``; the caller closes it when
    the load fails."""
    fd = _open_own_file(path, os.O_RDONLY)
    try:
        if not Path(f"/proc/self/fd/{fd}").exists():
            raise Untrusted("/proc/self/fd is not available to load it from")
        size = os.fstat(fd).st_size - _SEAL.size
        seal = os.pread(fd, _SEAL.size, size) if size >= 0 else b""
        magic, recorded, digest = _SEAL.unpack(seal) if len(seal) == _SEAL.size else (b"", 0, b"")
        if magic != _SEAL_MAGIC:
            raise Untrusted(
                "it does not end with its record of size and sha256: truncated, or built by "
                "an older version"
            )
        if recorded != size:
            raise Untrusted(f"it is {size} bytes, its record says {recorded}: truncated")
        if _digest(fd, size) != digest:
            raise Untrusted("its sha256 does not match its record: corrupt")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(path: str) -> None:
    """Append the record ``trusted_descriptor`` checks to the library just built at ``path``,
    and make it durable: a crash after the rename must not leave a short file under the name."""
    fd = _open_own_file(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        record = _SEAL.pack(_SEAL_MAGIC, size, _digest(fd, size))
        if os.pwrite(fd, record, size) != len(record):
            raise OSError(f"short write to {path}")
        os.fchmod(fd, 0o700)
        os.fsync(fd)
    finally:
        os.close(fd)


def compile_into(target: Path, command: Callable[[str], list[str]], what: str) -> Path:
    """Run ``command(output_path)`` to build ``what`` into ``target``, atomically and durably,
    sealed with the record of its size and sha256; raises ``RuntimeError`` saying why when the
    cache is not writable or the build fails."""
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
        _seal(tmp)
        os.replace(tmp, target)
        fsync_directory(cache)
    except (OSError, subprocess.TimeoutExpired, Untrusted) as err:
        raise RuntimeError(f"compiling {what} failed: {err}") from err
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return target


#: the C++ flags of the torch libraries built here (``$NESTRNN_CXXFLAGS`` replaces them)
DEFAULT_CXXFLAGS = "-O2 -std=c++20 -fPIC -shared -w"


def cxx_compiler() -> tuple[str, list[str]]:
    """The C++ compiler (``$CXX``, else ``c++`` or ``g++``) and its flags; RuntimeError without
    one."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    return compiler, shlex.split(os.environ.get("NESTRNN_CXXFLAGS", DEFAULT_CXXFLAGS))


def torch_build_key(source: Path, *versions: str, headers: Sequence[Path] = ()) -> str:
    """16 hex digits naming a build of ``source`` (and the ``headers`` of this package that it
    includes) with this compiler, its flags, this torch and ``versions``: a change of any of them
    is another file in the cache."""
    import torch

    compiler, flags = cxx_compiler()
    key = hashlib.sha256(source.read_bytes())
    for header in headers:
        key.update(header.read_bytes())
    key.update(
        " ".join(
            [compiler, *flags, torch.__version__, str(torch.version.git_version), *versions]
        ).encode()
    )
    return key.hexdigest()[:16]


def compile_torch_library(
    source: Path,
    target: Path,
    *,
    what: str,
    announce: str,
    includes: Sequence[Path] = (),
    defines: Sequence[str] = (),
    libraries: Sequence[str] = ("c10", "torch", "torch_cpu"),
) -> Path:
    """Compile the C++ ``source`` against this torch's headers and ``libraries`` into ``target``
    (:func:`compile_into`), after one line on stderr saying ``announce``: such a build takes
    long enough (the torch headers are large) to look like a hang otherwise."""
    import torch

    compiler, flags = cxx_compiler()
    root = Path(torch.__file__).parent
    torch_include = root / "include"
    if not (torch_include / "torch" / "library.h").exists():
        raise RuntimeError(f"no torch C++ headers in {torch_include}")
    command = [
        compiler,
        *flags,
        *defines,
        *(f"-I{path}" for path in [torch_include, torch_include / "torch/csrc/api/include"]),
        *(f"-I{path}" for path in includes),
        str(source),
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
        *(f"-l{name}" for name in libraries),
    ]
    print(f"nestrnn: {announce}", file=sys.stderr, flush=True)
    return compile_into(target, lambda output: [*command, "-o", output], what)


def open_or_build(
    path: Path, open_trusted: Callable[[Path], Loaded], build: Callable[[Path], Path]
) -> tuple[Loaded, str]:
    """``open_trusted(path)``, building ``path`` first when it is absent or ``open_trusted``
    refuses it (raises ``Untrusted``); gives the loaded library and, when a file there was
    refused and replaced, why (else ""). Raises ``RuntimeError`` (or ``OSError``) saying why
    when neither works."""
    refused: Untrusted | None = None
    if os.path.lexists(path):
        try:
            return open_trusted(path), ""
        except Untrusted as why:
            refused = why
    try:
        build(path)
    except RuntimeError as err:
        if refused is None:
            raise
        raise RuntimeError(f"{path} was refused ({refused}) and not replaced: {err}") from err
    try:
        loaded = open_trusted(path)
    except Untrusted as why:
        raise RuntimeError(f"{path} could not be loaded after building it: {why}") from None
    return loaded, "" if refused is None else str(refused)


@dataclass(frozen=True)
class NativeStatus:
    """Whether a library is in use: ``library`` is its path, else ``reason`` says why not."""

    available: bool
    reason: str
    library: Path | None = None
    replaced: str = ""  # why a file found under the library's name was refused and rebuilt

    def describe(self, name: str) -> str:
        """One line for ``python -m nestrnn.ops``: the library ``name`` in use, or why not."""
        if not self.available:
            return f"{name} unavailable: {self.reason}"
        return f"{name}: {self.library}" + (
            f" (rebuilt; the file found there was refused: {self.replaced})"
            if self.replaced
            else ""
        )


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
