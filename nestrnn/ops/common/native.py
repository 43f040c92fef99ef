"""Build, cache, check and load the CPU kernel (``cpu_kernel.c``) of the nested-LSTM op.

The kernel holds the time loops: per step the recurrent GEMMs and all pointwise math, in C. It has
no Python or PyTorch headers in it, so the system C compiler builds it in about a second; its
GEMMs call the BLAS that PyTorch links (MKL's packed GEMM where present), which it gets as function
pointers from torch's own library.

It is compiled on first use into the cache (``ops/common/build_cache.py``: where it is, and why a library
planted there is never loaded, nor its constructors run) under a name that hashes the source, the
compiler, its flags and this CPU (``-march=native``), and names the user: a cache shared between
machines and users keeps one build per kind of CPU and user. Before the first call the library's
ABI version and its argument-struct layout are compared with this module's mirror, and every
kernel call's return code is checked.

When anything is missing (no C compiler, a torch build without an exported ``sgemm_``, an
unwritable cache) the op runs its PyTorch loop instead: ``status()`` says which and why.
``NESTRNN_NATIVE=0`` turns the kernel off; ``CC`` and ``NESTRNN_CFLAGS`` choose the compiler and
its flags. ``python -m nestrnn.ops.common.native`` builds it ahead of time (say, in a
container image) and prints the status.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from nestrnn.ops.common import build_cache
from nestrnn.ops.common.build_cache import NativeStatus

__all__ = [
    "ABI_VERSION",
    "HEADER",
    "SIGNATURES",
    "STEP_FUNCTIONS",
    "Args",
    "Kernel",
    "Matrix",
    "NativeStatus",
    "args_layout",
    "build",
    "kernel",
    "library_path",
    "status",
]

ABI_VERSION = 9  # NLSTM_ABI_VERSION in nlstm_kernel.h (tests/test_native_header.py checks it)
#: the kernel's interface: what this module mirrors in ctypes (tests/test_native_header.py checks
#: the mirror against it)
HEADER = Path(__file__).parent / "nlstm_kernel.h"
#: every file of the build, all in its cache key
_SOURCES = (
    "cpu_kernel.c",
    "nlstm_kernel.h",
    "cpu_kernel_parts.h",
    "cpu_kernel_sequence.h",
    "cpu_kernel_steps.h",
)
_DEFAULT_CFLAGS = "-O3 -march=native -fopenmp-simd -fPIC -shared"


_INT, _I64, _I32, _PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class Args(ctypes.Structure):
    """Mirror of ``nlstm_args`` in nlstm_kernel.h, checked against the library on load."""

    _fields_ = [
        ("steps", ctypes.c_int64),
        ("batch", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("depth", ctypes.c_int64),
        ("reverse", ctypes.c_int64),
        ("save", ctypes.c_int64),
        ("batch_sizes", ctypes.c_void_p),
        ("activations", ctypes.c_void_p),
        ("gates", ctypes.c_void_p),
        ("inputs", ctypes.c_void_p),
        ("cells", ctypes.c_void_p),
        ("act_cells", ctypes.c_void_p),
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
        ("zoneout", ctypes.c_void_p),
        ("zoneout_level_stride", ctypes.c_int64),
        ("zoneout_step_stride", ctypes.c_int64),
        ("zoneout_row_stride", ctypes.c_int64),
        ("norms", ctypes.c_void_p),
        ("norm_gates", ctypes.c_void_p),
        ("norm_cells", ctypes.c_void_p),
        ("inv_std", ctypes.c_void_p),
        ("d_norms", ctypes.c_void_p),
    ]


def args_layout() -> str:
    """``nlstm_args_layout()``'s text for the mirror above: ``name:offset,...,size:N``."""
    fields = ",".join(f"{name}:{getattr(Args, name).offset}" for name, *_ in Args._fields_)
    return f"{fields},size:{ctypes.sizeof(Args)}"


class Kernel:
    """The loaded library: ``forward(dtype, args)`` and ``backward(dtype, args)``."""

    def __init__(self, lib: ctypes.CDLL):
        """Bind every entry point; raises ``RuntimeError`` when one is missing or the library
        was built for another ABI."""
        try:
            version, layout = _bind(lib, "nlstm_abi_version"), _bind(lib, "nlstm_args_layout")
            if version() != ABI_VERSION:
                raise RuntimeError(f"ABI version {version()}, expected {ABI_VERSION}")
            if layout().decode() != args_layout():
                raise RuntimeError("its argument struct does not match this module's mirror")
            self.set_blas = _bind(lib, "nlstm_set_blas")
            self._fns, self._steps, self._matrix = {}, {}, {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                for name in ("forward", "backward"):
                    self._fns[name, dtype] = _bind(lib, f"nlstm_{name}_{{}}", suffix)
                for name in STEP_FUNCTIONS:
                    self._steps[name, dtype] = _bind(lib, f"nlstm_{name}_{{}}", suffix)
                self._matrix[dtype] = (
                    _bind(lib, "nlstm_matrix_new_{}", suffix),
                    _bind(lib, "nlstm_matrix_free_{}", suffix),
                )
        except AttributeError as err:
            raise RuntimeError(f"the library lacks an entry point ({err})") from None

    def matrix(self, weight: torch.Tensor, transposed: bool, rows: int) -> Matrix:
        """``weight`` (row-major, contiguous) as a GEMM operand for ``step_function``s: ``W^T``
        when ``transposed``; packed for products with ``rows`` rows where MKL can. The
        ``Matrix`` keeps ``weight`` alive and frees its copy with itself."""
        new, free = self._matrix[weight.dtype]
        m, k = (weight.shape[0], weight.shape[1]) if transposed else weight.shape[::-1]
        handle = new(weight.data_ptr(), int(transposed), m, k, rows)
        if not handle:
            raise RuntimeError(
                f"the CPU kernel could not make a GEMM operand of {tuple(weight.shape)}"
            )
        return Matrix(handle, weight, free)

    def step_function(self, name: str, dtype: torch.dtype) -> Callable[..., None]:
        """One of the outer-step functions (``STEP_FUNCTIONS``, their arguments in ``SIGNATURES``:
        sizes, codes, then pointers as integers); raises when the kernel rejects its arguments."""
        fn = self._steps[name, dtype]

        def call(*args: int) -> None:
            if fn(*args) != 0:
                raise RuntimeError(f"the CPU kernel's {name} rejected its arguments")

        return call

    def step_address(self, name: str, dtype: torch.dtype) -> int:
        """The address of an outer-step function, for native code that calls it directly."""
        return cast(int, ctypes.cast(self._steps[name, dtype], ctypes.c_void_p).value)

    def matrix_free_address(self, dtype: torch.dtype) -> int:
        """The address of the function that frees a ``Matrix`` handle of this dtype."""
        return cast(int, ctypes.cast(self._matrix[dtype][1], ctypes.c_void_p).value)

    def forward(self, dtype: torch.dtype, args: Args) -> None:
        self._call("forward", dtype, args)

    def backward(self, dtype: torch.dtype, args: Args) -> None:
        self._call("backward", dtype, args)

    def _call(self, name: str, dtype: torch.dtype, args: Args) -> None:
        code = self._fns[name, dtype](ctypes.byref(args))
        if code != 0:
            raise RuntimeError(f"the CPU kernel's {name} rejected its arguments (error {code})")


class Matrix:
    """A weight matrix prepared by the kernel (``Kernel.matrix``); ``handle`` is its address."""

    def __init__(self, handle: int, weight: torch.Tensor, free: Callable[[int], None]):
        self.handle, self.weight = handle, weight  # the kernel may read the weight itself
        self._finalizer = weakref.finalize(self, free, handle)

    def release(self) -> int:
        """Hand the handle over: its new owner frees it (and keeps ``weight`` alive)."""
        self._finalizer.detach()
        return self.handle


#: the outer-step functions (the outer LSTM around a Python memory function, ops/outer_lstm)
STEP_FUNCTIONS = (
    "outer_gates",
    "outer_gates_backward",
    "outer_transition",
    "outer_output",
    "outer_transition_backward",
    "outer_output_backward",
)

#: every function of nlstm_kernel.h as ``name: (restype, argtypes)``, a ``{}`` in the name for
#: its f32 and f64 versions; pointers to elements and matrices are ``c_void_p`` (the callers pass
#: addresses as integers). tests/test_native_header.py checks it against the header.
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "nlstm_set_blas": (_INT, [_PTR] * 5),
    "nlstm_abi_version": (_INT, []),
    "nlstm_args_layout": (ctypes.c_char_p, []),
    "nlstm_forward_{}": (_INT, [ctypes.POINTER(Args)]),
    "nlstm_backward_{}": (_INT, [ctypes.POINTER(Args)]),
    "nlstm_matrix_new_{}": (_PTR, [_PTR, _I32, _I64, _I64, _I64]),
    "nlstm_matrix_free_{}": (None, [_PTR]),
    # rows, H, activation codes, then pointers; the input size where the steps' GEMMs take the
    # input too
    "nlstm_outer_gates_{}": (_INT, [_I64, _I64, _I32, _I32, _PTR, _PTR, _I64, *[_PTR] * 8]),
    "nlstm_outer_gates_backward_{}": (
        _INT,
        [_I64, _I64, _I32, _I32, *[_PTR] * 10, _I64, _PTR, _PTR],
    ),
    "nlstm_outer_transition_{}": (
        _INT,
        [_I64, _I64, _I32, _I32, _I32, _PTR, _PTR, _I64, *[_PTR] * 9],
    ),
    "nlstm_outer_output_{}": (_INT, [_I64, _I64, _I32, *[_PTR] * 4]),
    "nlstm_outer_transition_backward_{}": (
        _INT,
        [_I64, _I64, _I32, _I32, _I32, *[_PTR] * 13, _I64, _PTR, _PTR],
    ),
    "nlstm_outer_output_backward_{}": (_INT, [_I64, _I64, _I32, *[_PTR] * 5]),
}


def _bind(lib: ctypes.CDLL, name: str, suffix: str = "") -> Any:
    """``lib``'s function ``name`` (of ``SIGNATURES``, its ``{}`` filled with ``suffix``) with
    its restype and argtypes."""
    fn = getattr(lib, name.format(suffix))
    fn.restype, fn.argtypes = SIGNATURES[name]
    return fn


def kernel() -> Kernel | None:
    """The loaded kernel, building it on first use; None when unavailable (see ``status``)."""
    return _load()[0]


def status() -> NativeStatus:
    """Whether the CPU kernel can be used, building it if needed."""
    return _load()[1]


def _try_load() -> tuple[Kernel | None, NativeStatus]:
    blas = _torch_blas()
    if isinstance(blas, str):
        return None, NativeStatus(False, blas)
    try:
        path = library_path()
        lib, replaced = build_cache.open_or_build(path, _open_trusted, build)
    except (OSError, RuntimeError) as err:
        return None, NativeStatus(False, str(err))
    if lib.set_blas(*blas) != 0:
        return None, NativeStatus(False, f"{torch.__file__} gave no usable BLAS")
    return lib, NativeStatus(True, "built", path, replaced)


_load = build_cache.LoadOnce(
    _try_load, "NESTRNN_NATIVE", "CPU kernel", "the nested-LSTM op uses its slower PyTorch loop"
)


def _open_trusted(path: Path) -> Kernel:
    """Load ``path`` if it is ours and whole (``build_cache.trusted_descriptor``) and a kernel of
    this version, else raise ``build_cache.Untrusted`` saying why. A descriptor that was loaded
    stays open: the loader knows libraries by name, and a reused descriptor number would give
    back the earlier library."""
    fd = build_cache.trusted_descriptor(path)
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError as err:  # not a library for this machine (never loaded): rebuilt by the caller
        os.close(fd)
        raise build_cache.Untrusted(f"it does not load: {err}") from None
    try:
        return Kernel(lib)
    except RuntimeError as err:  # loaded, but from another version: rebuilt by the caller
        raise build_cache.Untrusted(f"it is another version of the kernel: {err}") from None


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
    return cast(list[ctypes.c_void_p], gemms + packed)  # None excluded above


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


def _compiler() -> tuple[str, list[str]]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    return compiler, shlex.split(os.environ.get("NESTRNN_CFLAGS", _DEFAULT_CFLAGS))


def library_path() -> Path:
    """Where the build for this source, compiler, flags, CPU and user lives in the cache."""
    compiler, cflags = _compiler()
    here = Path(__file__).parent
    key = hashlib.sha256()
    for name in _SOURCES:
        key.update((here / name).read_bytes())
    key.update(" ".join([compiler, *cflags, _cpu_signature()]).encode())
    return (
        build_cache.cache_dir() / f"cpu_kernel-{key.hexdigest()[:16]}{build_cache.user_suffix()}.so"
    )


def build(target: Path | None = None) -> Path:
    """Compile the kernel to ``target`` (default ``library_path()``, which a caller that has it
    passes), atomically (a concurrent builder never sees a partial file, and a file planted
    under that name is replaced); returns the path."""
    compiler, cflags = _compiler()
    source = Path(__file__).parent / "cpu_kernel.c"
    return build_cache.compile_into(
        target or library_path(),
        lambda output: [compiler, *cflags, "-o", output, str(source), "-lm"],
        "the CPU kernel",
    )


if __name__ == "__main__":
    print(status().describe("CPU kernel"))
