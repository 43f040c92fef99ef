"""Building, caching, trusting and falling back from the CPU kernel (``native.py``).

The kernel's numerics are tested in test_op_nested_lstm.py (the "c_loop" implementation); here:
the build goes to the cache once; a failed build or a disabled kernel leaves a working op (the
PyTorch loop) and says why; a library planted in the cache is never loaded (its constructor never
runs), nor is one that lacks an entry point or was built for another ABI: each is replaced by a
fresh build. Processes that must start without a loaded kernel run in a subprocess.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_native import needs_program, require

from nestrnn.ops.common import native

#: tests that compile libraries of their own with ``cc``
needs_compiler = needs_program("cc", "C compiler")


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
    from nestrnn.ops.common import native
    from nestrnn.ops.nested_lstm import LevelWeights, nested_lstm, nested_lstm_naive

    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)
    ws = [LevelWeights(r(16, 3 if k == 0 else 4), r(16, 4), r(16), r(16)) for k in range(2)]
    args = (r(5, 2, 3), ws, r(2, 4), r(2, 2, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = nested_lstm(*args)
    want = nested_lstm_naive(*args)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want))
    print("STATUS", native.status().available, native.status().reason)
    print("WARNINGS", [str(w.message) for w in caught])
"""


def require_kernel() -> None:
    require(native.status(), "CPU kernel")


def test_build_is_cached(tmp_path, monkeypatch):
    require_kernel()
    monkeypatch.setenv("NESTRNN_CACHE_DIR", str(tmp_path / "cache"))
    first = native.build()
    assert first == native.library_path() and first.parent == tmp_path / "cache"
    assert f"-u{os.getuid()}" in first.name  # one build per user in a shared cache
    assert first.stat().st_mode & 0o077 == 0  # nobody else may write (or read) it
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary files left
    # other flags are another build, beside the first
    monkeypatch.setenv("NESTRNN_CFLAGS", "-O2 -fPIC -shared")
    second = native.build()
    assert second != first and second.exists() and first.exists()


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
        [sys.executable, "-m", "nestrnn.ops.common.native"],
        capture_output=True,
        text=True,
        env={**os.environ, "NESTRNN_NATIVE": "0"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "CPU kernel unavailable: disabled by NESTRNN_NATIVE=0"


# ------------------------------------------------------------------------- untrusted libraries

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("ran", f); fclose(f); }
}
int nlstm_abi_version(void) { return ABI; }
const char *nlstm_args_layout(void) { return LAYOUT; }
"""


def compile_library(path: Path, marker: Path, abi: int, layout: str, mode: int) -> None:
    """A library with a constructor that writes ``marker`` and (some of) the kernel's entry
    points, at ``path`` with ``mode``."""
    source = path.with_suffix(".c")
    source.write_text(PLANTED)
    defines = [f'-DMARKER="{marker}"', f"-DABI={abi}", f'-DLAYOUT="{layout}"']
    subprocess.run(["cc", "-shared", "-fPIC", *defines, "-o", str(path), str(source)], check=True)
    source.unlink()
    path.chmod(mode)


CHECK_PLANTED = (
    CHECK_OP
    + """
    import os
    print("LOADED", native.status().library)
    print("RAN", os.path.exists(os.environ["MARKER"]))
"""
)


def planted_run(tmp_path: Path, abi: int, layout: str, mode: int, owner: int | None = None):
    """Plant a library where this user's build would be, then run the op in a fresh process."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    cache.mkdir()
    env = {"NESTRNN_CACHE_DIR": str(cache), "MARKER": str(marker)}
    target = Path(
        run_python(
            "from nestrnn.ops.common import native; print(native.library_path())", **env
        ).stdout.strip()
    )
    compile_library(target, marker, abi, layout, mode)
    if owner is not None:
        os.chown(target, owner, -1)
    done = run_python(CHECK_PLANTED, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout, target, marker


@needs_compiler
@pytest.mark.parametrize("mode", [0o777, 0o722])
def test_a_library_others_can_write_is_never_loaded(tmp_path, mode):
    """A group- or world-writable file in the cache may have been planted: it is not loaded, its
    constructor never runs, and a fresh build takes its place."""
    out, target, marker = planted_run(tmp_path, native.ABI_VERSION, native.args_layout(), mode)
    assert "STATUS True built" in out
    assert f"LOADED {target}" in out and "RAN False" in out and not marker.exists()
    assert target.stat().st_mode & 0o022 == 0  # replaced by our own build


@needs_compiler
@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs chown")
def test_a_library_of_another_user_is_never_loaded(tmp_path):
    out, target, marker = planted_run(
        tmp_path, native.ABI_VERSION, native.args_layout(), 0o700, owner=65534
    )
    assert "STATUS True built" in out and "RAN False" in out and not marker.exists()
    assert target.stat().st_uid == os.getuid()


@needs_compiler
@pytest.mark.parametrize(
    ("abi", "layout"),
    [(native.ABI_VERSION, "x:0,size:8"), (native.ABI_VERSION + 1, native.args_layout())],
    ids=["other struct layout", "other ABI version"],
)
def test_a_library_of_another_version_or_without_entry_points_is_rebuilt(tmp_path, abi, layout):
    """Our own file, but not a usable kernel (a stale build, a truncated write): loading it fails
    cleanly (no traceback) and it is rebuilt; the op runs the C loop."""
    out, target, _ = planted_run(tmp_path, abi, layout, 0o700)
    assert "STATUS True built" in out and f"LOADED {target}" in out


def test_the_struct_mirror_matches_the_library():
    require_kernel()
    assert native.args_layout().startswith("steps:0,batch:8,")
    assert native.kernel() is not None  # loading compared the layouts


def test_kernel_errors_are_raised_not_ignored():
    """A call the kernel refuses (here: depth 0) is an error, not a silently skipped loop."""
    require_kernel()
    codes = torch.zeros(3, dtype=torch.int32)
    args = native.Args(steps=1, batch=1, hidden=1, depth=0, activations=codes.data_ptr())
    with pytest.raises(RuntimeError, match="rejected its arguments"):
        native.kernel().forward(torch.float64, args)
    assert ctypes.sizeof(args) == int(native.args_layout().rsplit("size:", 1)[1])


def test_where_native_code_must_run_a_missing_compiler_fails_its_tests(tmp_path):
    """Under CI's ``NESTRNN_REQUIRE_NATIVE=1`` a test that needs the kernel, or a compiler of its
    own, fails where the compiler is missing (here: an empty PATH), rather than skipping."""
    tests = Path(__file__).parent
    chosen = [
        "test_native.py::test_build_is_cached",
        "test_native.py::test_a_library_of_another_version_or_without_entry_points_is_rebuilt",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *chosen],
        capture_output=True,
        text=True,
        cwd=tests,
        env={
            **os.environ,
            "PATH": str(tmp_path),
            "CC": "",
            "NESTRNN_CACHE_DIR": str(tmp_path / "cache"),
            "NESTRNN_REQUIRE_NATIVE": "1",
        },
        timeout=300,
    )
    assert "3 failed" in done.stdout, done.stdout[-3000:]
    assert "NESTRNN_REQUIRE_NATIVE=1: it must be here" in done.stdout
