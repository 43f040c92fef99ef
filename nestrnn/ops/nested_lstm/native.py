"""Build, cache and load the CPU kernel (``cpu_kernel.c``) of the nested-LSTM op.

The kernel holds the time loops: per step the recurrent GEMMs and all pointwise math, in C. It has
no Python or PyTorch headers in it, so the system C compiler builds it in about 1.3 s;
its GEMMs call the BLAS that PyTorch links (MKL's packed GEMM where present), which it gets as
function pointers from torch's own library.

It is compiled on first use into a cache directory (``$NESTRNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/nestrnn``, else ``~/.cache/nestrnn``), under a name that hashes the source, the
compiler, its flags and this CPU (``-march=native``), so a cache shared between machines keeps one
build per kind of CPU. When anything is missing (no C compiler, a torch build without an exported
``sgemm_``, an unwritable cache) the op runs its PyTorch loop instead: ``status()`` says which and
why. ``NESTRNN_NATIVE=0`` turns the kernel off; ``CC`` and ``NESTRNN_CFLAGS`` choose the compiler
and its flags. ``python -m nestrnn.ops.nested_lstm.native`` builds it ahead of time (say, in a
container image) and prints the status.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Args", "NativeStatus", "kernel", "status"]

_SOURCES = ("cpu_kernel.c", "cpu_kernel_loops.h")
_DEFAULT_CFLAGS = "-O3 -march=native -fopenmp-simd -fPIC -shared"


class Args(ctypes.Structure):
    """Mirror of ``nlstm_args`` in cpu_kernel.c (pointer arrays are ``c_void_p * n``)."""

    _fields_ = [
        ("steps", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("depth", ctypes.c_int64),
        ("reverse", ctypes.c_int64),
        ("save", ctypes.c_int64),
        ("cell_slots", ctypes.c_int64),
        ("batch_sizes", ctypes.c_void_p),
        ("gates", ctypes.c_void_p),
        ("inputs", ctypes.c_void_p),
        ("cells", ctypes.c_void_p),
        ("tanh_c", ctypes.c_void_p),
        ("h", ctypes.c_void_p),
        ("w_hh0", ctypes.c_void_p),
        ("w_nested", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("d_out", ctypes.c_void_p),
        ("dh", ctypes.c_void_p),
        ("dc", ctypes.c_void_p),
        ("d_gates", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("dht", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class NativeStatus:
    """Whether the CPU kernel is in use: ``library`` is its path, else ``reason`` says why not."""

    available: bool
    reason: str
    library: Path | None = None


class _Kernel:
    """The loaded library: ``forward(dtype, args)`` and ``backward(dtype, args)``."""

    def __init__(self, lib: ctypes.CDLL):
        self._fns = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            for name in ("forward", "backward"):
                fn = getattr(lib, f"nlstm_{name}_{suffix}")
                fn.argtypes = [ctypes.POINTER(Args)]
                fn.restype = ctypes.c_int
                self._fns[name, dtype] = fn

    def forward(self, dtype: torch.dtype, args: Args) -> None:
        self._fns["forward", dtype](ctypes.byref(args))

    def backward(self, dtype: torch.dtype, args: Args) -> None:
        self._fns["backward", dtype](ctypes.byref(args))


_lock = threading.Lock()
_state: tuple[_Kernel | None, NativeStatus] | None = None


def kernel() -> _Kernel | None:
    """The loaded kernel, building it on first use; None when unavailable (see ``status``)."""
    return _load()[0]


def status() -> NativeStatus:
    """Whether the CPU kernel can be used, building it if needed."""
    return _load()[1]


def _load() -> tuple[_Kernel | None, NativeStatus]:
    global _state
    with _lock:
        if _state is None:
            _state = _try_load()
            if not _state[1].available and os.environ.get("NESTRNN_NATIVE") != "0":
                warnings.warn(
                    f"nestrnn: CPU kernel not available ({_state[1].reason}); "
                    "the nested-LSTM op uses its slower PyTorch loop",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return _state


def _try_load() -> tuple[_Kernel | None, NativeStatus]:
    if os.environ.get("NESTRNN_NATIVE") == "0":
        return None, NativeStatus(False, "disabled by NESTRNN_NATIVE=0")
    blas = _torch_blas()
    if isinstance(blas, str):
        return None, NativeStatus(False, blas)
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as err:
        return None, NativeStatus(False, str(err))
    lib.nlstm_set_blas(*blas)
    return _Kernel(lib), NativeStatus(True, "built", path)


def _torch_blas() -> list[ctypes.c_void_p] | str:
    """Addresses of sgemm_, dgemm_ and MKL's packed sgemm in torch's CPU library (or why not)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libtorch_cpu.*"))
    if not candidates:
        return f"no libtorch_cpu in {lib_dir}"
    try:
        lib = ctypes.CDLL(str(candidates[0]))
    except OSError as err:
        return f"cannot open {candidates[0]}: {err}"

    def address(name: str) -> ctypes.c_void_p | None:
        try:
            return ctypes.c_void_p(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
        except AttributeError:
            return None

    gemms = [address("sgemm_"), address("dgemm_")]
    if None in gemms:
        return f"{candidates[0].name} exports no BLAS sgemm_/dgemm_"
    packed = [address(n) for n in ("sgemm_pack_get_size_", "sgemm_pack_", "sgemm_compute_")]
    if None in packed:
        packed = [ctypes.c_void_p(None)] * 3
    return gemms + packed


def _cache_dir() -> Path:
    if "NESTRNN_CACHE_DIR" in os.environ:
        return Path(os.environ["NESTRNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nestrnn"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> Path:
    """Compile the kernel into the cache (once per source, compiler, flags and CPU)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    cflags = shlex.split(os.environ.get("NESTRNN_CFLAGS", _DEFAULT_CFLAGS))
    here = Path(__file__).parent
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update((here / name).read_bytes())
    key.update(" ".join([compiler, *cflags, _cpu_signature()]).encode())
    cache = _cache_dir()
    target = cache / f"cpu_kernel-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
    except OSError as err:
        raise RuntimeError(f"cache directory {cache} is not writable: {err}") from err
    cmd = [compiler, *cflags, "-o", tmp, str(here / "cpu_kernel.c"), "-lm"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling the CPU kernel failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders never see a partial file
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"compiling the CPU kernel failed: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    found = status()
    print(
        f"CPU kernel: {found.library}"
        if found.available
        else f"CPU kernel unavailable: {found.reason}"
    )
