"""Build, cache and load the outer LSTM's native step nodes (``step_nodes.cpp``).

``stepwise.py`` does the outer LSTM's per-step work around a Python memory function in autograd
nodes of its own. Written as Python ``autograd.Function``s, each costs some microseconds of
interpreter time a step, forward and backward, next to the CPU kernel's few tens: these C++ nodes
do the same work without it. They are a Python extension built against this torch's headers,
with the C++ compiler (``$CXX``, else ``c++``), once per torch and Python version and user
(``_BUILD_COST``: a line on stderr says so when it starts), into the same cache as the CPU kernel
and under the same rules (``ops/common/build_cache.py``).

When they cannot be built (no C++ compiler or Python headers, an unwritable cache) stepwise.py
runs every step through its gates node and autograd: ``status()`` says why. ``NESTRNN_NATIVE_NODES=0`` turns them off;
``python -m nestrnn.ops`` builds them ahead of time.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import cast

import torch

from nestrnn.ops.common import build_cache, native
from nestrnn.ops.common.build_cache import NativeStatus

__all__ = ["ABI_VERSION", "build", "library_path", "module", "status"]

ABI_VERSION = 2  # the module's ABI_VERSION in step_nodes.cpp
_MODULE = "_nestrnn_step_nodes"
_SOURCE = Path(__file__).parent / "step_nodes.cpp"
#: what step_nodes.cpp includes of this package: the CPU kernel's interface, whose function types
#: the nodes call through
_HEADERS = (native.HEADER,)
# the cost a user is told to expect (a 2-core machine, idle or busy)
_BUILD_COST = "30-90 s and 1.1 GB of memory"


def module() -> ModuleType | None:
    """The loaded extension, building it on first use; None when unavailable (see ``status``)."""
    return _load()[0]


def status() -> NativeStatus:
    """Whether the native step nodes can be used, building them if needed."""
    return _load()[1]


def _try_load() -> tuple[ModuleType | None, NativeStatus]:
    try:
        path = library_path()
        loaded, replaced = build_cache.open_or_build(path, _open_trusted, build)
    except (OSError, RuntimeError) as err:
        return None, NativeStatus(False, str(err))
    return loaded, NativeStatus(True, "built", path, replaced)


_load = build_cache.LoadOnce(
    _try_load,
    "NESTRNN_NATIVE_NODES",
    "native step nodes",
    "memory functions of your own run without them, a little slower",
)


def _open_trusted(path: Path) -> ModuleType:
    """Import ``path`` if it is ours and whole (``build_cache.trusted_descriptor``) and of this
    ABI, else raise ``build_cache.Untrusted`` saying why. A descriptor that was loaded stays open
    (see native.py)."""
    fd = build_cache.trusted_descriptor(path)
    loader = importlib.machinery.ExtensionFileLoader(_MODULE, f"/proc/self/fd/{fd}")
    spec = importlib.util.spec_from_loader(_MODULE, loader)
    try:
        loaded = importlib.util.module_from_spec(cast(importlib.machinery.ModuleSpec, spec))
        loader.exec_module(loaded)
    except ImportError as err:  # not a module for this torch (never loaded): rebuilt
        os.close(fd)
        raise build_cache.Untrusted(f"it does not import: {err}") from None
    if getattr(loaded, "ABI_VERSION", None) != ABI_VERSION:
        raise build_cache.Untrusted(f"it is not of ABI version {ABI_VERSION}")
    return loaded


def _includes() -> list[Path]:
    """Python's headers, besides torch's: the nodes are a Python extension."""
    torch_include = Path(torch.__file__).parent / "include"
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").exists():
        raise RuntimeError(f"no Python headers in {python_include}")
    if not (torch_include / "torch" / "csrc" / "autograd" / "custom_function.h").exists():
        raise RuntimeError(f"no torch C++ headers in {torch_include}")
    return [python_include]


def library_path() -> Path:
    """Where the build for this source (and its headers), compiler, flags, torch, Python and user
    lives."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = build_cache.torch_build_key(_SOURCE, sys.version, suffix, headers=_HEADERS)
    return build_cache.cache_dir() / f"step_nodes-{key}{build_cache.user_suffix()}{suffix}"


def build(target: Path | None = None) -> Path:
    """Compile the extension to ``target`` (default ``library_path()``), atomically; returns the
    path. It happens once per process at most (callers load through LoadOnce)."""
    target = target or library_path()
    return build_cache.compile_torch_library(
        _SOURCE,
        target,
        what="the step nodes",
        announce=f"compiling the native step nodes for memory functions of your own into "
        f"{target.parent}, once per torch and Python version and user: about {_BUILD_COST} "
        f"(NESTRNN_NATIVE_NODES=0 runs without them, a little slower)",
        defines=[f"-DNESTRNN_MODULE_NAME={_MODULE}"],
        includes=_includes(),
        libraries=("c10", "torch", "torch_cpu", "torch_python"),
    )
