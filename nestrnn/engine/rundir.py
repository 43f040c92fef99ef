"""The run directory: the one place where a run writes files (rank 0 only).

Layout::

    runs/<task>-<timestamp>/
        config.yaml        the resolved configuration, with a comment per field (loadable with -c)
        environment.json   versions, device, command line, start time
        metrics.jsonl      one JSON record per line: "train" (every log_every steps), "epoch",
                           "test", "stopped" / "diverged"
        last.pt            the latest checkpoint (everything needed to resume exactly)
        best.pt            the model with the best validation metric so far
        summary.json       the final result
        .lock              locked while a process writes the run; holds that process's pid

Checkpoints and the other files are written atomically (a temporary file in the same folder, then
``os.replace``) and checkpoints are read with ``torch.load(weights_only=True)``: they hold only
tensors and plain Python containers. A write that fails (a full disk, a read-only folder) is a
one-line :class:`RunDirError` and leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
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
from nestrnn.engine.lock import DirectoryLock
from nestrnn.errors import UserError

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
LOCK = ".lock"
#: the files a run writes (what --overwrite replaces; the lock file stays)
RUN_FILES = (CONFIG, ENVIRONMENT, METRICS, LAST, BEST, SUMMARY)
FORMAT = "nestrnn-checkpoint/1"

#: what a new run may replace in its directory: nothing, the files of a run that saved no
#: checkpoint (``--resume auto``), or any run (``--overwrite``)
Replace = Literal["nothing", "incomplete", "any"]


class CheckpointError(UserError, ValueError):
    """A file that is not a readable nestrnn checkpoint, or one that does not fit the run."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked: taken, busy, not writable, full."""


def default_run_dir(task: str, root: str | Path = "runs") -> Path:
    """``runs/<task>-<YYYYmmdd-HHMMSS>`` (with a suffix when that exists already)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{task}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{task}-{stamp}-{suffix}"
    return path


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings ("nan", "inf"): JSON has no literal for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill or a full disk in the middle
    of a write) is left out, any other line that is not a JSON object is a RunDirError."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines):  # a complete line (the file continues after it)
            raise RunDirError(f"{path}, line {number} is not a JSON record; repair or remove it")
    return records


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
        return any((self.path / name).exists() for name in RUN_FILES)

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
            with writing(self.path / name), atomic_write(self.path / name, "w") as handle:
                handle.write(text)

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl."""
        if self.is_main:
            path = self.path / METRICS
            with writing(path), open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(json_safe(record)) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path / METRICS)

    def truncate_records(self, step: int) -> None:
        """Drop records written after optimizer step ``step`` (before resuming from there), and
        a torn last line."""
        if not self.is_main or not (self.path / METRICS).exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.write_text(METRICS, "".join(json.dumps(json_safe(r)) + "\n" for r in kept))

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        if self.is_main:
            buffer = io.BytesIO()  # serialised first: a failed write is then a plain OSError
            torch.save(payload, buffer)
            with writing(self.path / name), atomic_write(self.path / name) as handle:
                handle.write(buffer.getbuffer())

    def load_checkpoint(self, name: str = LAST, map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.path / name, map_location)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
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
    np_state = np.random.get_state()
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
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
         numpy["cached_gaussian"])
    )  # fmt: skip
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
