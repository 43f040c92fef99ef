"""Getting data files safely: downloads with checksums, atomic writes, clear errors.

Rules every task follows:

* a file is written only through :func:`atomic_write` (a temporary file in the same folder, flushed
  and synced, then ``os.replace``, then the folder synced), so an interrupted download never leaves a half file under the real name;
* a download is checked before it is moved into place: its length against ``Content-Length`` and the
  known size, its sha256 against the known checksum, and its format against the task's validator;
  reading stops as soon as it is longer than the longest it may be (``Content-Length``, the known
  size, :attr:`RemoteFile.max_size`, else :data:`MAX_DOWNLOAD_BYTES`), so a wrong or endless
  answer is not read to its end;
* a download has an overall deadline (``$NESTRNN_DOWNLOAD_DEADLINE`` seconds per file, one hour by
  default) besides the timeout of each read, so a server that trickles a byte now and then, and
  so never lets a read time out, cannot hold a run forever;
* a write that fails (a full disk, a read-only folder) is one error naming the folder, and leaves
  no temporary file;
* files are created with the mode the umask gives (``0o666 & ~umask``), like any other file, so a
  group that shares a data or run folder can read them;
* the checksum table of each task is explicit (:class:`RemoteFile`); ``sha256=None`` means that no
  canonical checksum is known, and then the size and format checks are what catch truncation;
* a file that fails a check raises :class:`DataError` naming the file and what is wrong, so a corrupt
  or truncated file is never used silently;
* base URLs can be replaced (a task option and/or an environment variable), so a mirror or a test
  server on 127.0.0.1 can stand in for the canonical location.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nestrnn.errors import UserError

DATA_DIR_ENV = "NESTRNN_DATA_DIR"
CHUNK = 1 << 20
#: the most bytes a download may have where neither the file's size, nor its task's maximum, nor
#: the server's Content-Length is known (every canonical data file is far smaller)
MAX_DOWNLOAD_BYTES = 4 << 30
#: the environment variable of the overall deadline of one file's download, in seconds
DEADLINE_ENV = "NESTRNN_DOWNLOAD_DEADLINE"
DEFAULT_DEADLINE = 3600.0
#: a download's temporary file untouched this long is a leftover of a killed process (a running
#: download writes at least once a minute: reads time out after 60 s)
STALE_TEMPORARY_SECONDS = 3600


class DataError(UserError, RuntimeError):
    """Missing, corrupt or truncated data; the message names the file and what to do."""


class DataWriteError(DataError):
    """A data file could not be written (a full disk, a read-only folder): another mirror would
    not help."""


@dataclass(frozen=True)
class RemoteFile:
    """A file a task can download: its name, and what is known about the canonical copy.

    Attributes:
        name: the file name on the server (appended to a base URL) and on disk.
        sha256: sha256 of the file as served; None where no canonical checksum is known.
        size: its size in bytes; None where unknown.
        max_size: where the size is unknown, the most bytes a download may have (None:
            :data:`MAX_DOWNLOAD_BYTES`).
    """

    name: str
    sha256: str | None = None
    size: int | None = None
    max_size: int | None = None


def default_data_root() -> Path:
    """``$NESTRNN_DATA_DIR`` when set, else ``~/.cache/nestrnn/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nestrnn" / "data"


def resolve_data_dir(option: str, subdir: str) -> Path:
    """A task's data folder: ``option`` when given, else ``default_data_root() / subdir``."""
    return Path(option).expanduser() if option else default_data_root() / subdir


def base_urls(
    option: str | Sequence[str] | None, env_var: str, defaults: Sequence[str]
) -> list[str]:
    """Base URLs to try, in order: the task option, then ``$env_var`` (comma-separated), then the
    canonical ``defaults``. A non-empty option or variable replaces the defaults."""
    if isinstance(option, str):
        option = [u for u in option.split(",") if u.strip()]
    if option:
        return [u.strip() for u in option]
    env = os.environ.get(env_var, "")
    if env.strip():
        return [u.strip() for u in env.split(",") if u.strip()]
    return list(defaults)


def download_deadline() -> float:
    """The overall deadline of one file's download: ``$NESTRNN_DOWNLOAD_DEADLINE`` seconds, else
    :data:`DEFAULT_DEADLINE`."""
    value = os.environ.get(DEADLINE_ENV, "").strip()
    if not value:
        return DEFAULT_DEADLINE
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise DataError(f"{DEADLINE_ENV} must be a number of seconds above 0, got {value!r}")
    return seconds


def join_url(base: str, name: str) -> str:
    return base if base.endswith(name) else base.rstrip("/") + "/" + urllib.parse.quote(name)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """A fresh name for the temporary file of an atomic write of ``path`` (same folder)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def temporaries_of(path: Path) -> list[Path]:
    """The temporary files that atomic writes of ``path`` may have left (after a kill)."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files that writes of ``path`` killed outright (SIGKILL, a power cut)
    left behind; one written to within ``STALE_TEMPORARY_SECONDS`` may belong to a running
    process, and stays."""
    now = time.time()
    for leftover in temporaries_of(path):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if now - leftover.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                leftover.unlink()


def fsync_directory(folder: str | Path) -> None:
    """Make a rename into ``folder`` durable: until the folder itself is synced, a power loss
    may forget the new name (or bring back the old file). Where folders cannot be opened or
    synced (Windows, some network file systems) this does nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` atomically and durably: yields a temporary file in the same folder, which
    replaces ``path`` only when the block finishes without an exception (otherwise it is
    removed). The file is synced before the rename and the folder after it, so that after a
    crash or a power loss ``path`` is the old file or the whole new one, never a short one.

    The file gets the mode the umask gives, as ``open`` would (not ``mkstemp``'s 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with open(tmp, mode) as handle:  # handle.name is the temporary path
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_file(path: Path, remote: RemoteFile) -> None:
    """Raise DataError when ``path`` does not have the known size or sha256 of ``remote``."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        state = "truncated" if size < remote.size else "too long"
        raise DataError(
            f"{path} is {state}: {size:,} bytes, expected {remote.size:,}; "
            "delete it to download it again"
        )
    if remote.sha256 is not None:
        actual = sha256_file(path)
        if actual != remote.sha256:
            raise DataError(
                f"{path} is corrupt: sha256 {actual} does not match the canonical "
                f"{remote.sha256}; delete it to download it again"
            )


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_size: int | None = None,
    validate: Callable[[Path], None] | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
    deadline: float | None = None,
) -> Path:
    """Download ``url`` to ``dest``, checking it before it appears under its name.

    Checks, in order: the number of bytes against ``Content-Length`` and ``size``, the sha256
    against ``sha256`` (when given), then ``validate(temporary_path)`` (a task's format check,
    raising DataError). Any failure removes the partial file and raises DataError naming the URL.
    Reading stops at the first byte beyond ``Content-Length``, ``size`` or ``max_size`` (else
    :data:`MAX_DOWNLOAD_BYTES`), and once the transfer has taken ``deadline`` seconds (None:
    :func:`download_deadline`); each read waits at most ``timeout`` seconds. A write that fails
    raises :class:`DataWriteError`. ``progress``: show a byte progress bar (None: only on a
    terminal).
    """
    dest = Path(dest)
    deadline = download_deadline() if deadline is None else deadline
    started = time.monotonic()
    try:
        # no single read may outlast the deadline either
        response = urllib.request.urlopen(url, timeout=min(timeout, deadline))
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise DataError(f"cannot download {url}: {_reason(error)}") from None
    declared = response.headers.get("Content-Length")
    total = int(declared) if declared and declared.isdigit() else size
    limit = min(n for n in (size, max_size, MAX_DOWNLOAD_BYTES) if n is not None)
    if total is not None and total > limit:  # announced too long: not worth a byte of disk
        response.close()
        known = "the canonical file has" if limit == size else "expected at most"
        raise DataError(
            f"download of {url} would have {total:,} bytes (its Content-Length), but {known} "
            f"{limit:,} bytes; not downloaded"
        )
    limit = min(limit, total) if total is not None else limit
    try:
        with response, atomic_write(dest) as handle:
            received, actual = _transfer(
                response,
                handle,
                url,
                name=dest.name,
                limit=limit,
                size=size,
                total=total,
                end=started + deadline,
                deadline=deadline,
                progress=progress,
            )
            if declared and declared.isdigit() and received != int(declared):
                raise DataError(
                    f"download of {url} is truncated: got {received:,} of {int(declared):,} bytes"
                )
            if size is not None and received != size:
                raise DataError(
                    f"download of {url} has {received:,} bytes, but the canonical file has "
                    f"{size:,} bytes"
                )
            if sha256 is not None and actual != sha256:
                raise DataError(
                    f"checksum mismatch for {url}: sha256 {actual}, expected {sha256}; "
                    "the download is corrupt or the server sent a different file"
                )
            if validate is not None:
                handle.flush()
                validate(Path(handle.name))
    except OSError as error:  # writing, flushing or renaming the file; reads raise DataError
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            need = f" ({total:,} bytes)" if total is not None else ""
            raise DataWriteError(
                f"no space left on the disk of {dest.parent} for {dest.name}{need}: free space "
                "there, or point task.data_dir (or $NESTRNN_DATA_DIR) at a disk with room"
            ) from None
        raise DataWriteError(
            f"cannot write {dest.name} in {dest.parent}: {error.strerror or error}"
        ) from None
    return dest


def _transfer(
    response: Any,
    handle: IO[bytes],
    url: str,
    *,
    name: str,
    limit: int,
    size: int | None,
    total: int | None,
    end: float,
    deadline: float,
    progress: bool | None,
) -> tuple[int, str]:
    """Copy ``response`` into ``handle``; stop beyond ``limit`` bytes or at ``time.monotonic()``
    ``end``. Returns the number of bytes received and their sha256."""
    received = 0
    digest = hashlib.sha256()
    bar = _progress_bar(total, name, progress)
    try:
        while True:
            want = min(CHUNK, limit + 1 - received)
            try:
                # read1: whatever one receive brings, so that a trickle cannot hide the deadline
                block = response.read1(want)
            except Exception as error:  # http.client.IncompleteRead, timeouts, resets
                if time.monotonic() < end:
                    raise DataError(
                        f"download of {url} broke off after {received:,} bytes: {_reason(error)}"
                    ) from None
                block = b""  # a read that timed out at the deadline: the deadline is the reason
            if time.monotonic() >= end:
                raise DataError(
                    f"download of {url} took longer than {deadline:g} s ({received:,} bytes "
                    f"received); the server is too slow: try again later, another task.base_url, "
                    f"or a longer deadline (${DEADLINE_ENV}, in seconds)"
                )
            if not block:
                return received, digest.hexdigest()
            if received + len(block) > limit:
                known = "the canonical file has" if limit == size else "expected at most"
                raise DataError(
                    f"download of {url} has more than {limit:,} bytes, but {known} "
                    f"{limit:,} bytes; stopped reading it"
                )
            handle.write(block)
            digest.update(block)
            received += len(block)
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()


def fetch(
    remote: RemoteFile,
    data_dir: str | Path,
    urls: Sequence[str],
    *,
    allow_download: bool = True,
    validate: Callable[[Path], None] | None = None,
    check_local: Callable[[Path], None] | None = None,
    how_to: str = "",
    progress: bool | None = None,
) -> Path:
    """Make sure ``data_dir / remote.name`` exists and is good; download it when missing.

    An existing file is checked with ``check_local`` (default: size and sha256 when known, then
    ``validate``). A missing one is downloaded from each base URL in turn. ``how_to`` is added to
    the error when the file is missing and cannot be downloaded.
    """
    folder = Path(data_dir)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"the data folder {folder} is a file; point task.data_dir at a folder")
    path = folder / remote.name
    if path.is_dir():
        raise DataError(f"{path} is a folder; the data file {remote.name} belongs there")
    if path.exists():
        if check_local is not None:
            check_local(path)
        else:
            check_file(path, remote)
            if validate is not None:
                validate(path)
        return path
    if not allow_download or not urls:
        reason = "downloads are disabled (task.download=false)" if urls else "it has no download"
        raise DataError(f"{path} is missing and {reason}. {how_to}".strip())
    remove_stale_temporaries(path)
    deadline = download_deadline()  # a bad value is the user's to fix, not a mirror's fault
    errors = []
    for base in urls:
        url = join_url(base, remote.name)
        print(f"downloading {url} -> {path}", file=sys.stderr)
        try:
            return download(
                url,
                path,
                sha256=remote.sha256,
                size=remote.size,
                max_size=remote.max_size,
                validate=validate,
                progress=progress,
                deadline=deadline,
            )
        except DataWriteError:
            raise  # the next mirror would meet the same disk
        except DataError as error:
            errors.append(str(error))
            print(f"  failed: {error}", file=sys.stderr)
    tried = "; ".join(errors)
    raise DataError(f"could not obtain {remote.name}: {tried}. {how_to}".strip())


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _progress_bar(total: int | None, name: str, enabled: bool | None) -> Any:
    if enabled is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        leave=False,
        disable=None if enabled is None else not enabled,
        file=sys.stderr,
    )


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a decoding error names the file and the byte offset."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {error.start:,}: {error.reason}); "
            "is it corrupt or in another encoding?"
        ) from None
