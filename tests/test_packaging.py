"""The wheel: the experiment configs and the native sources are package data, and ``-c NAME`` finds
the configs in an installed copy, far from any checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers_tasks import REPO

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the source and unpacked into a folder."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "dist", "*.egg-info", "__pycache__", "runs", "tests", "benchmarks"
        ),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(root / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("nestrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("nestrnn/configs/") and n.endswith(".yaml")] == [
        f"nestrnn/configs/{name}" for name in CONFIGS
    ]
    sources = ("common/cpu_kernel.c", "common/nlstm_kernel.h", "outer_lstm/step_nodes.cpp")
    for source in sources:
        assert f"nestrnn/ops/{source}" in names  # compiled on first use
    site = root / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def _python(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_bare_config_names_resolve_to_the_package_data(installed: Path, tmp_path: Path) -> None:
    code = "from nestrnn.config import resolve_config_path as r; print(r('ptb_char'))"
    result = _python(installed, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == installed / "nestrnn" / "configs" / "ptb_char.yaml"

    printed = _python(
        installed, tmp_path, "-m", "nestrnn", "train", "-c", "mnist_glimpses", "--print-config"
    )
    assert printed.returncode == 0, printed.stderr
    assert "name: mnist_glimpses" in printed.stdout and "target_params: 250000" in printed.stdout


def test_version_is_the_distributions(installed: Path, tmp_path: Path) -> None:
    """``nestrnn --version`` prints the version the wheel was built with (one place holds it)."""
    (info,) = installed.glob("nestrnn-*.dist-info")
    metadata = (info / "METADATA").read_text()
    version = next(
        line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Version: ")
    )
    printed = _python(installed, tmp_path, "-m", "nestrnn", "--version")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == f"nestrnn {version}"
    code = (
        "import importlib.metadata as m, nestrnn; print(m.version('nestrnn'), nestrnn.__version__)"
    )
    assert _python(installed, tmp_path, "-c", code).stdout.split() == [version, version]


def test_the_triton_launch_table_is_package_data(installed: Path, tmp_path: Path) -> None:
    """The GPU launch configurations are read from the installed package's JSON table (choosing one
    needs neither Triton nor a GPU); the removed triton_nested plugin is not shipped."""
    code = (
        "from nestrnn.ops.nested_lstm import triton_configs as c\n"
        "print(c.TABLE_PATH)\n"
        "print(c.measured_blocks(32, 256, c.torch.bfloat16, True))\n"
    )
    result = _python(installed, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    path, blocks = result.stdout.strip().splitlines()
    assert Path(path) == installed / "nestrnn" / "ops" / "nested_lstm" / "triton_configs.json"
    assert blocks == "(32, 16, 32, 4, None, True)"
    assert not (installed / "nestrnn" / "plugins" / "triton_nested").exists()
