"""Build, cache and find the op's library for processes without Python (``torch_library.cpp``).

A TorchScript file (``torch.jit.trace``), an ExportedProgram or an AOTInductor package of a
model with a NestedLSTM records the operator ``nestrnn::nested_lstm`` (``nestrnn::
nested_lstm_projected`` with ``proj_size`` above depth 1). A process that does not import nestrnn
(a C++ program, a Python server without nestrnn installed) gets both operators from this shared
library: ``torch.ops.load_library(path)`` in Python, ``dlopen`` or linking it in C++.
Its kernel computes the reference's function (``naive.py``) in ATen calls, inference only.

It is built with the C++ compiler (``$CXX``, else ``c++``) against this torch's headers and
libraries (no Python), once per torch version and user, into the cache of compiled libraries and
under its rules (``ops/common/build_cache.py``): the file returned is ours, whole and sealed. The seal
after its end is ignored by the dynamic loader, so the file can be copied and loaded anywhere
with the same torch.

The library defines the operator only where it is not defined yet, so loading it in a process
that imported nestrnn changes nothing. The other order cannot work: nestrnn's Python operator
(with autograd and fake tensors) cannot be defined over it, and importing nestrnn then stops with
one clear error (``refuse_foreign_definition``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nestrnn.ops.common import build_cache

__all__ = ["OPERATOR", "build", "library_path", "refuse_foreign_definition"]

OPERATOR = "nestrnn::nested_lstm"
_SOURCE = Path(__file__).parent / "torch_library.cpp"
# the time a user is told to expect; the torch headers are most of it
_BUILD_COST = "20-60 s"


def _cache_name() -> Path:
    """Where the build for this source, compiler, flags, torch and user lives."""
    key = build_cache.torch_build_key(_SOURCE)
    return build_cache.cache_dir() / f"nested_lstm_library-{key}{build_cache.user_suffix()}.so"


def build(target: Path) -> Path:
    """Compile the library to ``target``, atomically and sealed; returns the path."""
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)  # std::string in the schema's signature
    return build_cache.compile_torch_library(
        _SOURCE,
        target,
        what="the nested-LSTM library",
        announce=f"compiling the nested-LSTM library for processes without nestrnn into "
        f"{target.parent}, once per torch version and user: about {_BUILD_COST}",
        defines=[f"-D_GLIBCXX_USE_CXX11_ABI={abi}"],
        libraries=("c10", "torch_cpu", "torch"),
    )


def _checked(path: Path) -> Path:
    """``path`` if it is ours and whole (``build_cache.trusted_descriptor``), else raises
    ``build_cache.Untrusted``. Only checked here: whoever loads it loads it by path."""
    os.close(build_cache.trusted_descriptor(path))
    return path


def library_path() -> Path:
    """The path of the library, built first if needed (see the module docstring); raises
    ``RuntimeError`` saying why when it cannot be built."""
    path, _ = build_cache.open_or_build(_cache_name(), _checked, build)
    return path


def refuse_foreign_definition() -> None:
    """Raise ``ImportError`` if ``nestrnn::nested_lstm`` is defined already, by this library
    loaded before nestrnn was imported: nestrnn's own operator cannot be defined over it."""
    try:
        torch._C._get_schema(OPERATOR, "")
    except RuntimeError:  # not defined: the usual case
        return
    raise ImportError(
        f"the operator {OPERATOR} is already defined in this process (by nestrnn's library for "
        f"processes without nestrnn, loaded before nestrnn was imported): import nestrnn first, "
        f"or do not load that library in a process that uses nestrnn"
    )
