"""Faults of the kernel cache as a user meets them (``ops/common/build_cache.py``).

A FIFO planted under a library's name in a shared cache, a library cut short by a crash during
its build, one with a flipped byte, one left by a version that recorded no size and sha256: each
is refused and replaced by a fresh build, and the op runs and is right, in a fresh process (where
a truncated library used to kill the process with SIGBUS and a FIFO to block it for ever).
``python -m nestrnn.ops`` says what was refused. The first build of the step nodes, which is slow,
says so once on stderr. Builds and atomic writes sync the file and its folder.

The step nodes' tests use a stand-in C++ compiler that copies a real build of them (this
process's, in the default cache), so that they take seconds, not the real build's minute.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_native import require, unavailable
from test_native import CHECK_OP, needs_compiler
from test_native_nodes import CHECK_GENERIC_PATH

from nestrnn import data_utils
from nestrnn.ops.common import build_cache, native
from nestrnn.ops.outer_lstm import native_nodes

HANG = 120  # seconds: a run that blocks on a FIFO is stopped here, and fails the test

CHECK_KERNEL = CHECK_OP + "\n    print('REPLACED', native.status().replaced)\n"
CHECK_NODES = CHECK_GENERIC_PATH + "\n    print('REPLACED', native_nodes.status().replaced)\n"
BUILD_MESSAGE = "nestrnn: compiling the native step nodes"


def run(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with ``cache`` as the kernel cache; a hang fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            env={**os.environ, "NESTRNN_CACHE_DIR": str(cache), **env},
            timeout=HANG,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process hung for {HANG} s")


def assert_whole_library(path: Path) -> None:
    """``path`` is a library the cache loads as it is: ours, regular and whole."""
    os.close(build_cache.trusted_descriptor(path))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ the CPU kernel


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory) -> bytes:
    """The bytes of a build of the CPU kernel by this version."""
    cache = tmp_path_factory.mktemp("kernel")
    previous = os.environ.get("NESTRNN_CACHE_DIR")
    os.environ["NESTRNN_CACHE_DIR"] = str(cache)
    try:
        return native.build().read_bytes()
    except RuntimeError as err:
        unavailable(f"the CPU kernel cannot be built here: {err}")
    finally:
        if previous is None:
            del os.environ["NESTRNN_CACHE_DIR"]
        else:
            os.environ["NESTRNN_CACHE_DIR"] = previous


def kernel_path(cache: Path, monkeypatch) -> Path:
    monkeypatch.setenv("NESTRNN_CACHE_DIR", str(cache))
    return native.library_path()


@needs_compiler
def test_a_fifo_under_the_kernels_name_is_replaced_not_waited_on(tmp_path, monkeypatch):
    path = kernel_path(tmp_path, monkeypatch)
    os.mkfifo(path)  # nobody ever writes to it: opening it to read would block
    done = run(CHECK_KERNEL, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "STATUS True built" in done.stdout
    assert "REPLACED it is a FIFO, not a regular file" in done.stdout
    assert stat.S_ISREG(path.lstat().st_mode)
    assert_whole_library(path)


def previous_version_build(path: Path) -> None:
    """What the version before sealed libraries left: the compiler's output as it is."""
    compiler, flags = native._compiler()
    source = Path(native.__file__).parent / "cpu_kernel.c"
    subprocess.run([compiler, *flags, "-o", str(path), str(source), "-lm"], check=True)


@needs_compiler
@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (truncate, "it does not end with its record of size and sha256: truncated"),
        (flip_byte, "its sha256 does not match its record: corrupt"),
        (None, "it does not end with its record of size and sha256"),
    ],
    ids=["truncated", "a flipped byte", "no record (an older version)"],
)
def test_a_damaged_kernel_is_rebuilt_not_loaded(tmp_path, monkeypatch, built_kernel, damage, why):
    """A crash during a build, a bad disk, or a build by a version that recorded nothing: the
    next process neither dies (SIGBUS) nor runs what is there, but rebuilds it."""
    path = kernel_path(tmp_path, monkeypatch)
    if damage is None:
        previous_version_build(path)
    else:
        path.write_bytes(built_kernel)
        damage(path)
    path.chmod(0o700)
    damaged = path.read_bytes()
    done = run(CHECK_KERNEL, tmp_path)
    assert done.returncode == 0, done.stderr  # not -7 (SIGBUS)
    assert "STATUS True built" in done.stdout and f"REPLACED {why}" in done.stdout
    assert path.read_bytes() != damaged
    assert_whole_library(path)  # what the next process loads as it is


@needs_compiler
def test_the_command_line_says_what_was_refused(tmp_path, monkeypatch, built_kernel):
    path = kernel_path(tmp_path, monkeypatch)
    path.write_bytes(built_kernel)
    truncate(path)
    path.chmod(0o700)
    done = subprocess.run(
        [sys.executable, "-m", "nestrnn.ops"],
        capture_output=True,
        text=True,
        env={**os.environ, "NESTRNN_CACHE_DIR": str(tmp_path), "NESTRNN_NATIVE_NODES": "0"},
        timeout=HANG,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == (
        f"CPU kernel: {path} (rebuilt; the file found there was refused: it does not end with "
        "its record of size and sha256: truncated, or built by an older version)"
    )


@needs_compiler
def test_a_folder_under_the_kernels_name_is_reported(tmp_path, monkeypatch):
    """What cannot be replaced by a build (a folder) is reported: the op runs its PyTorch loop and
    the warning says what is there."""
    path = kernel_path(tmp_path, monkeypatch)
    path.mkdir()
    done = run(CHECK_KERNEL, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"STATUS False {path} was refused (it is a directory, not a regular file)" in done.stdout


# ------------------------------------------------------------------------------ the step nodes

COPYING_COMPILER = """#!/bin/sh
# stands in for the C++ compiler: "builds" by copying a real build of the step nodes
while [ "$#" -gt 0 ]; do
    if [ "$1" = "-o" ]; then cp "{library}" "$2"; exit $?; fi
    shift
done
exit 1
"""


@pytest.fixture
def copying_compiler(tmp_path) -> dict[str, str]:
    """The environment of a process whose C++ compiler copies this process's build of the step
    nodes, and whose kernel cache is empty."""
    found = native_nodes.status()
    require(found, "native step nodes")
    script = tmp_path / "c++"
    script.write_text(COPYING_COMPILER.format(library=found.library))
    script.chmod(0o755)
    return {"CXX": str(script), "NESTRNN_CACHE_DIR": str(tmp_path / "cache")}


def nodes_path(env: dict[str, str], monkeypatch) -> Path:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = native_nodes.library_path()
    path.parent.mkdir(parents=True)
    return path


def test_the_first_build_of_the_step_nodes_says_so_once(copying_compiler):
    cache = Path(copying_compiler["NESTRNN_CACHE_DIR"])
    first = run(CHECK_NODES, cache, CXX=copying_compiler["CXX"])
    assert first.returncode == 0, first.stderr
    assert "STATUS True built" in first.stdout
    assert first.stderr.count(BUILD_MESSAGE) == 1, first.stderr
    message = next(line for line in first.stderr.splitlines() if BUILD_MESSAGE in line)
    assert str(cache) in message and "NESTRNN_NATIVE_NODES=0" in message
    second = run(CHECK_NODES, cache, CXX=copying_compiler["CXX"])
    assert second.returncode == 0, second.stderr
    assert "STATUS True built" in second.stdout and BUILD_MESSAGE not in second.stderr


@pytest.mark.parametrize(
    ("damage", "why"),
    [(os.mkfifo, "it is a FIFO, not a regular file"), (truncate, "it does not end with")],
    ids=["a FIFO", "truncated"],
)
def test_a_fifo_or_a_truncated_build_of_the_step_nodes_is_rebuilt(
    copying_compiler, monkeypatch, damage, why
):
    path = nodes_path(copying_compiler, monkeypatch)
    if damage is truncate:
        shutil.copy(native_nodes.status().library, path)
    damage(path)
    cache = Path(copying_compiler["NESTRNN_CACHE_DIR"])
    done = run(CHECK_NODES, cache, CXX=copying_compiler["CXX"])
    assert done.returncode == 0, done.stderr
    assert "STATUS True built" in done.stdout and f"REPLACED {why}" in done.stdout
    assert done.stderr.count(BUILD_MESSAGE) == 1
    assert_whole_library(path)


# ---------------------------------------------------------------------------------- durability


def synced_folders(monkeypatch) -> list[str]:
    """The folders ``os.fsync`` is called on from now on (a rename is durable only then)."""
    synced, fsync = [], os.fsync

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_atomic_writes_sync_their_folder(tmp_path, monkeypatch):
    synced = synced_folders(monkeypatch)
    with data_utils.atomic_write(tmp_path / "checkpoint.pt") as handle:
        handle.write(b"weights")
    assert synced == [str(tmp_path)]


@needs_compiler
def test_builds_sync_their_folder(tmp_path, monkeypatch):
    path = kernel_path(tmp_path, monkeypatch)
    synced = synced_folders(monkeypatch)
    native.build(path)
    assert synced == [str(tmp_path)]
