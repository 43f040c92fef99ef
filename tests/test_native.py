"""Building, caching and falling back from the CPU kernel (``native.py``).

The kernel's numerics are tested in test_op_fused.py ("own-native"); here: the build goes to the
cache once, a failed build or a disabled kernel leaves a working op (the PyTorch loop) and says why.
Processes that must start without a loaded kernel run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from nestrnn.ops.nested_lstm import native


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


# the op on a small case against the naive reference, then the kernel's status
CHECK_OP = """
    import warnings
    import torch
    from nestrnn.ops.nested_lstm import native
    from nestrnn.ops.nested_lstm.common import LevelWeights
    from nestrnn.ops.nested_lstm.fused import nested_lstm_own
    from nestrnn.ops.nested_lstm.naive import nested_lstm_naive

    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)
    ws = [LevelWeights(r(16, 3 if k == 0 else 4), r(16, 4), r(16), r(16)) for k in range(2)]
    args = (r(5, 2, 3), ws, r(2, 4), r(2, 2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = nested_lstm_own(*args)
    want = nested_lstm_naive(*args)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
    print("STATUS", native.status().available, native.status().reason)
    print("WARNINGS", [str(w.message) for w in caught])
"""


def test_build_is_cached(tmp_path, monkeypatch):
    if not native.status().available:
        pytest.skip(f"CPU kernel unavailable: {native.status().reason}")
    monkeypatch.setenv("NESTRNN_CACHE_DIR", str(tmp_path / "cache"))
    first = native._build()
    assert first.parent == tmp_path / "cache" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left
    # other flags are another build, beside the first
    monkeypatch.setenv("NESTRNN_CFLAGS", "-O2 -fPIC -shared")
    second = native._build()
    assert second != first and second.exists()


def test_failed_build_falls_back_with_a_warning(tmp_path):
    done = run_python(CHECK_OP, CC="false", NESTRNN_CACHE_DIR=str(tmp_path), NESTRNN_NATIVE="1")
    assert done.returncode == 0, done.stderr
    assert "STATUS False compiling the CPU kernel failed" in done.stdout
    assert "slower PyTorch loop" in done.stdout  # the one warning says what happens instead
    assert not list(tmp_path.iterdir())  # nothing half-written in the cache


def test_missing_compiler_is_reported(tmp_path):
    done = run_python(CHECK_OP, CC="", PATH=str(tmp_path), NESTRNN_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "STATUS False no C compiler found" in done.stdout


def test_disabled_kernel_is_silent():
    done = run_python(CHECK_OP, NESTRNN_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert "STATUS False disabled by NESTRNN_NATIVE=0" in done.stdout
    assert "WARNINGS []" in done.stdout


def test_unwritable_cache_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_python(CHECK_OP, NESTRNN_CACHE_DIR=str(blocker / "cache"))
    assert done.returncode == 0, done.stderr
    assert "STATUS False cache directory" in done.stdout


def test_command_line_status():
    done = subprocess.run(
        [sys.executable, "-m", "nestrnn.ops.nested_lstm.native"],
        capture_output=True,
        text=True,
        env={**os.environ, "NESTRNN_NATIVE": "0"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CPU kernel unavailable: disabled by NESTRNN_NATIVE=0"
