"""What the benchmark scripts share: importing nestrnn from this checkout, also on a machine that
has nothing but torch and triton, and describing the machine for the result files.

``nestrnn/__init__.py`` loads the plugin registry, which needs pluggy; the op package
``nestrnn.ops.nested_lstm`` needs only torch (and triton for its kernels). Where the package's
own dependencies are missing (a bare GPU machine), :func:`import_nestrnn` registers an empty
``nestrnn`` package that points at the checkout, so that the op imports without the top-level
``__init__``; the layer (``NestedLSTM``) and the registry are then unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

#: two depth-3 activation variants (``gate,candidate,cell`` a level) that between them put every
#: activation the fused kernels know in every role
ACTIVATION_VARIANTS = (
    ("sigmoid,relu,softsign", "tanh,hardtanh,identity", "softsign,identity,relu"),
    ("hardtanh,softsign,hardtanh", "identity,sigmoid,sigmoid", "relu,tanh,tanh"),
)


def import_nestrnn() -> str | None:
    """Put this checkout first on ``sys.path`` and import ``nestrnn``.

    Returns None when the whole package imported, else why only the op is available (the name of
    the missing dependency).
    """
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        import nestrnn  # noqa: F401
    except ModuleNotFoundError as err:
        if not err.name or err.name.split(".")[0] in ("nestrnn", "torch"):
            raise
        package = types.ModuleType("nestrnn")
        package.__path__ = [str(REPO_ROOT / "nestrnn")]
        sys.modules["nestrnn"] = package
        return f"{err.name} is not installed"
    return None


def activation_variant(index: int, depth: int) -> tuple:
    """The first ``depth`` levels of ``ACTIVATION_VARIANTS[index]`` as ``LevelActivations``."""
    from nestrnn.ops.nested_lstm import LevelActivations

    return tuple(
        LevelActivations(*level.split(",")) for level in ACTIVATION_VARIANTS[index][:depth]
    )


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'32x256x100,128x512x100' -> [(B, H, T), ...] (an argparse type)."""
    shapes = []
    for part in text.split(","):
        try:
            b, h, t = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not BxHxT") from None
        if min(b, h, t) < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r} has a size below 1")
        shapes.append((b, h, t))
    return shapes


def scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|), in float64 (NaN where either has one)."""
    want = want.double()
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


@contextlib.contextmanager
def triton_configs(choose) -> Iterator[None]:
    """Inside the block, the op's Triton loops start their launch configuration from
    ``choose(batch, hidden, given)`` (a ``TritonConfig``; ``given`` is what the op passed, usually
    None) and ``triton_loop.pick_config`` fills in what it leaves unset."""
    import torch

    from nestrnn.ops.nested_lstm import triton_loop  # imports Triton

    pick = triton_loop.pick_config

    def patched(batch, hidden, config=None, dtype=torch.float32, graphed=False):
        return pick(batch, hidden, choose(batch, hidden, config), dtype, graphed)

    triton_loop.pick_config = patched
    try:
        yield
    finally:
        triton_loop.pick_config = pick


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str:
    """The NVIDIA driver version from nvidia-smi (or why it is unknown)."""
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"
    return run.stdout.strip().splitlines()[0] if run.stdout.strip() else "unknown"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


#: the keys of :func:`describe_machine` (the rest of a script's ``info`` is its own settings)
MACHINE_KEYS = frozenset(
    ("device_type", "torch", "triton", "python", "cpu", "cpu_count", "device", "capability")
) | {"memory_gib", "driver", "cuda"}


def describe_machine(device_type: str) -> dict:
    """Card or CPU, driver and library versions: the header of every result file."""
    import torch

    info = {
        "device_type": device_type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=nvidia_driver(),
            cuda=torch.version.cuda,
        )
    else:
        info["device"] = info["cpu"]
    return info


def describe_line(info: dict) -> str:
    """One line of :func:`describe_machine`'s facts."""
    parts = [info["device"]]
    if info["device_type"] == "cuda":
        parts += [
            f"capability {info['capability']}",
            f"driver {info['driver']}",
            f"CUDA {info['cuda']}",
        ]
    parts += [f"torch {info['torch']}", f"triton {info['triton'] or 'not installed'}"]
    return ", ".join(parts)


# ------------------------------------------------------------------------------ result files
#: the version of the layout of a result file: ``{"schema", "meta", "rows", ...}``
RESULT_SCHEMA = 1


def git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether it has uncommitted changes (None, None outside git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def result_meta(device_type: str, argv: list[str] | None = None, **settings: object) -> dict:
    """The ``meta`` of a result file: where, when, with what and by which command it was measured,
    then the script's own ``settings``. Anything unknown is None, never guessed."""
    import datetime

    info = describe_machine(device_type)
    commit, dirty = git_state()
    gpu = None
    if device_type == "cuda":
        keys = ("capability", "memory_gib", "driver", "cuda")
        gpu = {"name": info["device"], **{key: info[key] for key in keys}}
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_ROOT)
    command = [str(script), *(sys.argv[1:] if argv is None else argv)]
    return {
        "commit": commit,
        "dirty": dirty,
        "machine": {"cpu": info["cpu"], "cores": info["cpu_count"], "gpu": gpu},
        "torch": info["torch"],
        "triton": info["triton"],
        "python": info["python"],
        "command": " ".join(["python", *command]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **settings,
    }


def write_result(path: str | Path, meta: dict, rows: list, **sections: object) -> None:
    """Write one result file: ``meta`` (see :func:`result_meta`), the measured ``rows``, and any
    further ``sections`` of the script's own (raw timings, notes)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"schema": RESULT_SCHEMA, "meta": meta, "rows": rows, **sections}
    path.write_text(json.dumps(payload, indent=1) + "\n")
