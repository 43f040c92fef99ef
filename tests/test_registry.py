"""The plugin registry: built-ins, entry points, broken plugins, duplicates, script decorators."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nestrnn
from nestrnn import registry
from nestrnn.memory import MemoryFunction, NestedMemory, build_memory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_registry():
    registry.reset_registry()
    yield
    registry.reset_registry()


def make_distribution(root: Path, dist: str, module: str, source: str, entry: str) -> None:
    """An installed distribution in ``root`` (a sys.path entry) with a ``nestrnn`` entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[nestrnn]\n{entry} = {module}\n")


GOOD_PLUGIN = """
import nestrnn
from nestrnn.memory import AdditiveMemory

class Doubling(AdditiveMemory):
    "c = 2 (f*c + i*g)"
    def forward(self, gated_cell, gated_input, state):
        return 2 * (gated_cell + gated_input), ()

@nestrnn.hookimpl
def register_memories(register):
    register("doubling", Doubling)
"""

DUPLICATE_PLUGIN = """
import nestrnn
from nestrnn.memory import AdditiveMemory

@nestrnn.hookimpl
def register_memories(register):
    register("doubling", AdditiveMemory, "same name as another plugin's")
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_registered_through_hooks(fresh_registry):
    assert {"additive", "nested", "triton_nested"} <= set(nestrnn.memory_names())
    report = registry.get_registry().report()
    builtin = {p["name"]: p for p in report["plugins"] if p["builtin"]}
    assert builtin["nestrnn.memory.builtin"]["registered"]["memory"] == ["additive", "nested"]
    assert report["failures"] == []


def test_entry_point_plugin_is_loaded_with_its_distribution(plugin_path):
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    entry = registry.get_memory("doubling")
    assert entry.provider.distribution == "nestrnn-doubling"
    assert entry.provider.version == "1.2.3"
    assert entry.description == "c = 2 (f*c + i*g)"
    layer = nestrnn.NestedLSTM(2, 3, memory="doubling")
    assert type(layer.memory_l0).__name__ == "Doubling"
    assert layer.memory_l0.fused_levels() is None  # overridden forward: generic path


def test_broken_plugins_are_reported_and_do_not_stop_the_others(plugin_path):
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    make_distribution(
        plugin_path, "nestrnn-broken", "broken_plugin", "raise ImportError('boom')", "broken"
    )
    make_distribution(
        plugin_path,
        "nestrnn-raising",
        "raising_plugin",
        "import nestrnn\n@nestrnn.hookimpl\ndef register_memories(register):\n    1 / 0\n",
        "raising",
    )
    reg = registry.get_registry()
    assert "doubling" in reg.names("memory") and "nested" in reg.names("memory")
    failures = {f["name"]: f for f in reg.report()["failures"]}
    assert failures["broken"]["distribution"] == "nestrnn-broken"
    assert "ImportError: boom" in failures["broken"]["error"]
    assert "ZeroDivisionError" in failures["raising"]["error"]


def test_duplicate_names_are_an_error_naming_both_providers(plugin_path):
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    make_distribution(plugin_path, "nestrnn-dup", "dup_plugin", DUPLICATE_PLUGIN, "dup")
    with pytest.raises(registry.RegistryError) as error:
        nestrnn.NestedLSTM(2, 3, memory="doubling")
    assert "nestrnn-doubling" in str(error.value) and "nestrnn-dup" in str(error.value)
    conflicts = registry.get_registry().report()["conflicts"]
    assert conflicts[0]["name"] == "doubling" and len(conflicts[0]["providers"]) == 2


def test_environment_variable_disables_external_plugins(plugin_path, monkeypatch):
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    names = nestrnn.memory_names()
    assert "doubling" not in names and "nested" in names
    assert registry.get_registry().report()["external_plugins_disabled"]


def test_decorator_registers_script_memory_functions(fresh_registry):
    @nestrnn.register_memory("halving_test", description="c = (f*c + i*g) / 2")
    class Halving(MemoryFunction):
        def forward(self, gated_cell, gated_input, state):
            return (gated_cell + gated_input) / 2, ()

    try:
        layer = nestrnn.NestedLSTM(2, 3, memory="halving_test")
        assert isinstance(layer.memory_l0, Halving)
        out, (h, c) = layer(torch.randn(4, 1, 2))
        assert c.shape == (1, 1, 3)
        registry.reset_registry()  # script registrations survive a rebuild
        assert "halving_test" in nestrnn.memory_names()
    finally:
        registry._script_entries.clear()


def test_unknown_memory_lists_known_names(fresh_registry):
    with pytest.raises(registry.RegistryError, match="known memory names: .*additive.*nested"):
        nestrnn.NestedLSTM(2, 3, memory="nestd")


def test_memory_spec_forms(fresh_registry):
    assert build_memory("nested", 4).num_states == 1
    assert build_memory({"name": "nested", "depth": 4}, 4).num_states == 3
    instance = NestedMemory(4)
    assert build_memory(instance, 4) is instance
    assert build_memory(lambda h: NestedMemory(h, depth=3), 4).num_states == 2
    inherited = build_memory("nested", 4, {"bias": False})
    assert inherited.bias_ih is None and inherited.inner is not None
    with pytest.raises(TypeError, match="invalid options for memory 'nested'.*colour"):
        build_memory({"name": "nested", "colour": "red"}, 4)
    with pytest.raises(ValueError, match="needs a 'name' key"):
        build_memory({"depth": 3}, 4)
    with pytest.raises(ValueError, match="hidden_size 5 but the layer's hidden_size is 4"):
        build_memory(NestedMemory(5), 4)
    with pytest.raises(TypeError, match="memory must be"):
        build_memory(3, 4)


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "nestrnn.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def pip_install(project: Path, target: Path) -> dict[str, str]:
    """Install ``project`` with pip into the folder ``target``; the environment that sees it."""
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(project),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return {**os.environ, "PYTHONPATH": str(target)}


def test_plugins_command_lists_installed_example_plugin(tmp_path):
    """Install the example plugin with pip into a fresh target and list it through the CLI."""
    env = pip_install(REPO / "plugins" / "gru_memory", tmp_path / "site")
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    gru = [p for p in report["plugins"] if p["name"] == "gru"]
    assert gru and gru[0]["distribution"] == "nestrnn-gru"
    assert gru[0]["registered"]["memory"] == ["gru"]
    listing = run_cli("memories", env=env)
    assert "gru" in listing.stdout and "nestrnn-gru" in listing.stdout
    text = run_cli("plugins", env={**env, registry.DISABLE_ENV: "1"})
    assert "gru" not in text.stdout and "disabled" in text.stdout


EXITING_PROJECT = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "nestrnn-exiting"
        version = "0.3.0"

        [project.entry-points.nestrnn]
        exit_at_import = "exit_at_import"
        exit_in_hook = "exit_in_hook"

        [tool.setuptools]
        py-modules = ["exit_at_import", "exit_in_hook"]
    """,
    "exit_at_import.py": """
        import sys

        sys.exit("no GPU found")
    """,
    "exit_in_hook.py": """
        import sys

        import nestrnn

        @nestrnn.hookimpl
        def register_tasks(register):
            sys.exit(3)
    """,
}


def test_a_plugin_calling_sys_exit_is_reported_and_every_command_still_runs(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name, text in EXITING_PROJECT.items():
        (project / name).write_text(textwrap.dedent(text))
    env = pip_install(project, tmp_path / "site")
    result = run_cli("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    failures = {f["name"]: f for f in json.loads(result.stdout)["failures"]}
    assert failures["exit_at_import"] == {
        "name": "exit_at_import",
        "distribution": "nestrnn-exiting",
        "version": "0.3.0",
        "error": "SystemExit: the plugin called sys.exit('no GPU found')",
    }
    assert failures["exit_in_hook"]["error"] == (
        "register_tasks: SystemExit: the plugin called sys.exit(3)"
    )
    text = run_cli("plugins", env=env)
    assert "FAILED exit_at_import [nestrnn-exiting]: SystemExit" in text.stdout
    memories = run_cli("memories", env=env)
    assert memories.returncode == 0 and "nested" in memories.stdout, memories.stderr
    tasks = run_cli("tasks", env=env)
    assert tasks.returncode == 0 and "ptb_char" in tasks.stdout, tasks.stderr
    assert "2 plugin(s) failed to load" in tasks.stdout
