"""Building, trusting and falling back from the outer LSTM's native step nodes (``native_nodes.py``).

Their numerics are tested in test_op_outer_lstm.py (against the naive path, and beside the Python
nodes); here: CI must have them; without a C++ compiler, or turned off, the generic path still
runs and is right, and says why; a file in the cache that is not ours, or is broken, is never
imported. Processes that must start without loaded nodes run in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers_native import needs_program, require
from test_native import compile_library, needs_compiler, run_python

from nestrnn.ops.common.build_cache import Untrusted
from nestrnn.ops.outer_lstm import native_nodes

# a user's memory function on the generic path against the naive reference, then the status
CHECK_GENERIC_PATH = """
    import warnings
    import torch
    from nestrnn import MemoryFunction
    from nestrnn.ops.nested_lstm import LevelWeights
    from nestrnn.ops.outer_lstm import native_nodes, outer_lstm, outer_lstm_naive

    class Leaky(MemoryFunction):
        def forward(self, gated_cell, gated_input, state):
            return 0.5 * gated_cell + torch.tanh(gated_input), ()

    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    weights = LevelWeights(r(16, 3), r(16, 4), r(16), r(16))
    args = (r(5, 2, 3), weights, Leaky(4), r(2, 4), r(1, 2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = outer_lstm(*args)
    want = outer_lstm_naive(*args)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want))
    grads = [torch.autograd.grad(sum(t.sum() for t in out), weights.weight_hh)[0]
             for out in (got, want)]
    assert torch.allclose(*grads, atol=1e-12)
    print("STATUS", native_nodes.status().available, native_nodes.status().reason)
    print("WARNINGS", [str(w.message) for w in caught])
"""


def test_available_where_required():
    """CI (``NESTRNN_REQUIRE_NATIVE=1``) has a C++ compiler and Python headers: the nodes must
    build there, so that their tests run rather than skip."""
    found = native_nodes.status()
    require(found, "native step nodes")
    assert found.library is not None and found.library.parent.is_dir()


@needs_program("cc", "C compiler (for the CPU kernel)")
def test_without_a_cpp_compiler_the_python_nodes_run_and_it_says_why(tmp_path):
    done = run_python(CHECK_GENERIC_PATH, CXX="false", NESTRNN_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "STATUS False compiling the step nodes failed" in done.stdout
    assert "native step nodes not available (compiling the step nodes failed" in done.stdout


def test_turned_off_without_a_warning():
    done = run_python(CHECK_GENERIC_PATH, NESTRNN_NATIVE_NODES="0")
    assert done.returncode == 0, done.stderr
    assert "STATUS False disabled by NESTRNN_NATIVE_NODES=0" in done.stdout
    assert "WARNINGS []" in done.stdout


def test_command_line_status():
    done = subprocess.run(
        [sys.executable, "-m", "nestrnn.ops"],
        capture_output=True,
        text=True,
        env={**os.environ, "NESTRNN_NATIVE": "0", "NESTRNN_NATIVE_NODES": "0"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "CPU kernel unavailable: disabled by NESTRNN_NATIVE=0",
        "native step nodes unavailable: disabled by NESTRNN_NATIVE_NODES=0",
    ]


def test_files_that_are_not_ours_or_are_broken_are_never_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTRNN_CACHE_DIR", str(tmp_path))
    path = native_nodes.library_path()
    assert path.parent == tmp_path and f"-u{os.getuid()}" in path.name
    found = native_nodes.status()
    if found.available:  # a real build, but others may write it
        shutil.copy(found.library, path)
        path.chmod(0o775)
        with pytest.raises(Untrusted, match="others may write it"):
            native_nodes._open_trusted(path)
        path.unlink()
    path.write_bytes(b"\x7fELF truncated")  # ours, but no loadable module: rebuilt by the caller
    path.chmod(0o700)
    with pytest.raises(Untrusted, match="truncated"):
        native_nodes._open_trusted(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.so")
    with pytest.raises(Untrusted, match="symbolic link"):
        native_nodes._open_trusted(path)


@needs_compiler
def test_a_library_others_can_write_never_runs(tmp_path, monkeypatch):
    """A group-writable file where the build would be may have been planted: its constructor
    never runs."""
    monkeypatch.setenv("NESTRNN_CACHE_DIR", str(tmp_path))
    path, marker = native_nodes.library_path(), tmp_path / "marker"
    compile_library(path, marker, abi=1, layout="", mode=0o775)
    with pytest.raises(Untrusted):
        native_nodes._open_trusted(path)
    assert not marker.exists()
