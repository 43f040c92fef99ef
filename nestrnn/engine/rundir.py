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

Checkpoints are written atomically (a temporary file in the same folder, then ``os.replace``) and
read with ``torch.load(weights_only=True)``: they hold only tensors and plain Python containers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nestrnn.data_utils import atomic_write

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
FORMAT = "nestrnn-checkpoint/1"


def default_run_dir(task: str, root: str | Path = "runs") -> Path:
    """``runs/<task>-<YYYYmmdd-HHMMSS>`` (with a suffix when that exists already)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{task}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(root) / f"{task}-{stamp}-{suffix}"
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDir:
    """Reads and writes a run directory; every write is skipped unless ``is_main``."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            with atomic_write(self.path / name, "w") as handle:
                handle.write(text)

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl."""
        if self.is_main:
            with open(self.path / METRICS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_json_safe(record)) + "\n")

    def records(self) -> list[dict[str, Any]]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def truncate_records(self, step: int) -> None:
        """Drop records written after optimizer step ``step`` (before resuming from there)."""
        if not self.is_main or not (self.path / METRICS).exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        self.write_text(METRICS, "".join(json.dumps(_json_safe(r)) + "\n" for r in kept))

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        if self.is_main:
            with atomic_write(self.path / name) as handle:
                torch.save(payload, handle)
                _test_pause(self.path / name)

    def load_checkpoint(self, name: str = LAST, map_location: Any = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.path / name, map_location)


def _test_pause(path: Path) -> None:
    """Test hook: ``NESTRNN_TEST_CHECKPOINT_PAUSE=SECONDS`` sleeps inside the atomic write of a
    checkpoint that replaces an existing one (temporary file written, ``os.replace`` not yet done),
    after printing ``NESTRNN_TEST_CHECKPOINT_PAUSE <path>`` so that a test can kill the process."""
    seconds = os.environ.get("NESTRNN_TEST_CHECKPOINT_PAUSE")
    if seconds and path.exists():
        import time

        print(f"NESTRNN_TEST_CHECKPOINT_PAUSE {path}", flush=True)
        time.sleep(float(seconds))


class CheckpointError(ValueError):
    """A file that is not a readable nestrnn checkpoint."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
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
