"""The run directory: the one place where a run writes files (rank 0 only).

Layout::

    runs/<task>-<timestamp>/
        config.yaml        the resolved configuration, with a comment per field (loadable with -c)
        environment.json   versions, device, command line, start time
        metrics.jsonl      one JSON record per line: "train" (every log_every steps), "epoch",
                           "test", "stopped" / "diverged"
        last.pt            the latest checkpoint (everything needed to resume exactly)
        best.pt            the model with the best validation metric so far
        last.pt.sha256     the sha256 of last.pt (``sha256sum -c`` reads it)
        best.pt.sha256     the sha256 of best.pt
        summary.json       the final result
        .lock              locked while a process writes the run; holds that process's pid

Checkpoints and the other files are written atomically (a temporary file in the same folder, then
``os.replace``) and checkpoints are read with ``torch.load(weights_only=True)``: they hold only
tensors and plain Python containers. A write that fails (a full disk, a read-only folder) is a
one-line :class:`RunDirError` and leaves the previous file as it was.

No file of a run is opened through a symbolic link, and none that is a FIFO, a device or a
directory (:mod:`nestrnn.engine.runfiles`): each is a one-line error naming it.

Every checkpoint is verified against its ``.sha256`` before it is used, so a flipped bit is an
error, not a silently different model. A checkpoint is replaced in three atomic steps: the
``.sha256`` first lists the new sum *and* the sums of the file in place, then the checkpoint is
replaced, then the ``.sha256`` lists the new sum alone. A crash between any two steps leaves a
checkpoint whose sum is listed, so it never blocks a resume. A checkpoint without a ``.sha256``
(written by nestrnn before 0.x, or its ``.sha256`` deleted on purpose) loads unchecked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nestrnn.data_utils import atomic_write, temporaries_of
from nestrnn.engine import runfiles
from nestrnn.engine.lock import DirectoryLock
from nestrnn.errors import UserError

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
LOCK = ".lock"
#: beside each checkpoint: its sha256 (see the module docstring)
SUM_SUFFIX = ".sha256"
#: the files a run writes (what --overwrite replaces; the lock file stays)
RUN_FILES = (
    CONFIG,
    ENVIRONMENT,
    METRICS,
    LAST,
    BEST,
    SUMMARY,
    LAST + SUM_SUFFIX,
    BEST + SUM_SUFFIX,
)
FORMAT = "nestrnn-checkpoint/1"

#: what a new run may replace in its directory: nothing, the files of a run that saved no
#: checkpoint (``--resume auto``), or any run (``--overwrite``)
Replace = Literal["nothing", "incomplete", "any"]


class CheckpointError(UserError, ValueError):
    """A file that is not a readable nestrnn checkpoint, or one that does not fit the run."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked: taken, busy, not writable, full."""


def default_run_dir(task: str, root: str | Path = "runs") -> tuple[Path, list[Path]]:
    """Create ``runs/<task>-<YYYYmmdd-HHMMSS>`` (with a suffix when that exists already); it and
    the folders created for it (innermost first: see :func:`remove_empty`). Each name is taken
    by ``mkdir``, which fails when the folder exists: two runs started in the same second never
    share a directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(root)
    suffix = 1
    path = root / f"{task}-{stamp}"
    while True:
        created = [] if root.is_dir() else [root]
        try:
            with writing(root):
                root.mkdir(parents=True, exist_ok=True)
            path.mkdir()
            return path, [path, *created]
        except FileExistsError:
            suffix += 1
            path = root / f"{task}-{stamp}-{suffix}"
        except FileNotFoundError:  # another run removed an empty runs/ meanwhile: again
            continue
        except OSError as error:
            raise RunDirError(f"cannot create {path}: {error.strerror or error}") from None


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run created that are still empty (a run that failed before writing
    anything leaves nothing behind); a folder that holds anything stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("nan", "inf"): JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _record_fault(record: Any) -> str | None:
    """What is wrong with one line of metrics.jsonl as a record (None: nothing): every record
    is an object with an ``event`` name and an integer ``step``; ``train``/``valid`` hold
    metrics by name."""
    if not isinstance(record, dict):
        return "is not a JSON record"
    if not isinstance(record.get("event"), str):
        return 'has no "event" name'
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return 'has no "step" number'
    if any(not isinstance(record.get(key, {}), dict) for key in ("train", "valid")):
        return "has metrics that are not an object"
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill or a full disk in the middle
    of a write) is left out, any other line that is not a record is a RunDirError."""
    if not os.path.lexists(path):
        return []
    data = runfiles.read_bytes(path, RunDirError)
    lines = data.decode("utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            fault: str | None = "is not a JSON record"
        else:
            fault = _record_fault(record)
        if fault is None:
            records.append(record)
        elif number < len(lines):  # a complete line (the file continues after it)
            raise RunDirError(f"{path}, line {number} {fault}; repair or remove it")
    return records


def read_summary(path: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished run (None when there is none); a RunDirError when it
    is not a JSON object."""
    if not os.path.lexists(path):
        return None
    data = runfiles.read_bytes(path, RunDirError)
    try:
        summary = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict):
        raise RunDirError(
            f"{path} is not a run summary (a JSON object); remove it (train --resume of a "
            "finished run writes it again)"
        )
    return summary


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` (full disk, read-only folder) into a RunDirError."""
    try:
        yield
    except OSError as error:
        raise RunDirError(f"cannot write {path}: {error.strerror or error}") from None


class RunDir:
    """Reads and writes a run directory; every write is skipped unless ``is_main``."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- what is there

    def holds_run(self) -> bool:
        """Whether any file of a run is here (a finished, running, or killed one)."""
        return any(os.path.lexists(self.path / name) for name in RUN_FILES)

    def resumable(self) -> bool:
        """Whether a run can continue from here (its configuration and ``last.pt``)."""
        return (self.path / CONFIG).is_file() and (self.path / LAST).is_file()

    def check_new_run(self, replace: Replace) -> None:
        """RunDirError unless a new run may start here: ``replace`` is ``"nothing"``,
        ``"incomplete"`` (a run without a checkpoint) or ``"any"`` (see :class:`Trainer`)."""
        self.check_is_directory()
        if replace != "any" and (self.path / LAST).exists():
            raise RunDirError(
                f"{self.path} already holds a run (with {LAST}); continue it with --resume "
                f"{self.path}, replace it with --overwrite, or choose another --run-dir"
            )
        if replace == "nothing" and self.holds_run():
            raise RunDirError(
                f"{self.path} holds the files of a run that saved no checkpoint; start it again "
                "with --overwrite (or --resume auto), or choose another --run-dir"
            )
        if replace == "incomplete" and self.holds_run() and not self.written_by_a_run():
            # e.g. a config.yaml put there by hand: --resume auto replaces only a run's files
            found = next(name for name in RUN_FILES if os.path.lexists(self.path / name))
            raise RunDirError(
                f"{self.path / found} was not written by a run (there is no {ENVIRONMENT}) and "
                f"is not replaced without --overwrite; to train with a configuration there, give "
                f"it with -c {self.path / CONFIG} --run-dir {self.path} --overwrite"
            )

    def written_by_a_run(self) -> bool:
        """Whether the files here are a run's: a run writes environment.json before any other."""
        return os.path.lexists(self.path / ENVIRONMENT)

    def check_is_directory(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")

    def check_not_busy(self) -> None:
        """LockError when another process is writing this run (writes nothing)."""
        DirectoryLock.check_free(self.path / LOCK, f"the run directory {self.path}")

    def lock(self) -> DirectoryLock:
        """Create the directory if needed and hold its lock (LockError when another process
        holds it); release it with ``.release()`` or a ``with`` block."""
        self.check_is_directory()
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        return DirectoryLock.acquire(self.path / LOCK, f"the run directory {self.path}")

    # -- writing (with the lock held)

    def remove_leftovers(self) -> None:
        """Remove temporary files of atomic writes that a killed process left."""
        for name in RUN_FILES:
            for leftover in temporaries_of(self.path / name):
                with writing(leftover):
                    leftover.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the files of a previous run (``--overwrite``); other files stay."""
        self.remove_leftovers()
        for name in RUN_FILES:
            with writing(self.path / name):
                (self.path / name).unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            self._write(self.path / name, text.encode("utf-8"))

    def _write(self, path: Path, data: bytes) -> None:
        """Replace ``path`` atomically; a link (or a FIFO, a directory) there is refused, not
        replaced."""
        runfiles.check_regular(path, RunDirError)
        with writing(path), atomic_write(path) as handle:
            handle.write(data)

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl."""
        if self.is_main:
            path = self.path / METRICS
            line = (json.dumps(json_safe(record)) + "\n").encode("utf-8")
            with writing(path):
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
                with os.fdopen(runfiles.open_regular(path, flags, RunDirError), "ab") as handle:
                    handle.write(line)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path / METRICS)

    def truncate_records(self, step: int) -> None:
        """Drop records written after optimizer step ``step`` (before resuming from there), and
        a torn last line."""
        if not self.is_main or not os.path.lexists(self.path / METRICS):
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.write_text(METRICS, "".join(json.dumps(json_safe(r)) + "\n" for r in kept))

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        """Write checkpoint ``name`` and its sha256 (in the order the module docstring gives)."""
        if self.is_main:
            buffer = io.BytesIO()  # serialised first: a failed write is then a plain OSError
            torch.save(payload, buffer)
            data = buffer.getvalue()
            path, sums = self.path / name, sum_path(self.path / name)
            digest = hashlib.sha256(data).hexdigest()
            self._write(sums, _sum_lines([digest, *self._sums_in_place(path)], name))
            self._write(path, data)
            self._write(sums, _sum_lines([digest], name))

    def _sums_in_place(self, path: Path) -> list[str]:
        """The sums that the checkpoint at ``path`` now matches (none when there is none)."""
        if not os.path.lexists(path):
            return []
        recorded = recorded_sums(path)
        if recorded is not None:
            return recorded
        # written before checkpoints had sums: its own, so that it stays loadable meanwhile
        return [hashlib.sha256(runfiles.read_bytes(path, RunDirError)).hexdigest()]

    def load_checkpoint(self, name: str = LAST, map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.path / name, map_location)


def sum_path(path: Path) -> Path:
    """Where the sha256 of the checkpoint at ``path`` is kept: ``last.pt.sha256``."""
    return path.with_name(path.name + SUM_SUFFIX)


def _sum_lines(digests: list[str], name: str) -> bytes:
    """``sha256sum``'s format; the sums are distinct (the same checkpoint written twice)."""
    return "".join(f"{d}  {name}\n" for d in dict.fromkeys(digests)).encode("ascii")


def recorded_sums(path: Path) -> list[str] | None:
    """The sums recorded for the checkpoint at ``path`` (None: no ``.sha256`` beside it)."""
    sums = sum_path(path)
    if not os.path.lexists(sums):
        return None
    text = runfiles.read_bytes(sums, CheckpointError).decode("ascii", errors="replace")
    digests = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not digests or not all(
        len(d) == 64 and all(c in "0123456789abcdef" for c in d) for d in digests
    ):
        raise CheckpointError(
            f"{sums} is not a list of sha256 sums; restore it, or delete it to load {path.name} "
            "unchecked"
        )
    return digests


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, follow_links: bool = False
) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) after checking its sha256 (when it has
    one: see the module docstring); a clear error when it is not one, or damaged.

    ``follow_links``: ``path`` may be a symbolic link (a file the user named, not a run's)."""
    path = Path(path)
    if follow_links and path.is_symlink():
        path = path.resolve()
    if not os.path.lexists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    data = runfiles.read_bytes(path, CheckpointError)
    recorded = recorded_sums(path)
    if recorded is not None and hashlib.sha256(data).hexdigest() not in recorded:
        raise CheckpointError(
            f"{path} is damaged: its sha256 does not match {sum_path(path).name}, recorded when "
            "it was written; restore it from a copy (or delete "
            f"{sum_path(path).name} to load it unchecked)"
        )
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:
        detail = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {detail[:300]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nestrnn checkpoint")
    return payload


# --------------------------------------------------------------------------- RNG & environment


def capture_rng() -> dict[str, Any]:
    """The state of every random number generator a run uses (tensors and plain types only)."""
    version, keys, gauss = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, saved as environment.json."""
    import omegaconf

    from nestrnn import __version__

    info: dict[str, Any] = {
        "nestrnn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "omegaconf": omegaconf.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        "cuda": torch.version.cuda,
        "command": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["triton"] = importlib.metadata.version("triton")
    return info
