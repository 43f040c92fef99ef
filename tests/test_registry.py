"""The plugin registry: built-ins, entry points, broken plugins, duplicates, script decorators."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nestrnn
from nestrnn import hookspecs, registry
from nestrnn.memory import AdditiveMemory, MemoryFunction, NestedMemory, build_memory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_registry():
    """A registry rebuilt for the test; the script registrations it made are forgotten after it."""
    kept = list(registry._script_entries)
    registry.reset_registry()
    yield
    registry._script_entries[:] = kept
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
    assert {"additive", "nested"} <= set(nestrnn.memory_names())
    assert "triton_nested" not in nestrnn.memory_names()  # removed: use "nested"
    report = registry.get_registry().report()
    builtin = {p["name"]: p for p in report["plugins"] if p["builtin"]}
    assert builtin["nestrnn.memory.builtin"]["registered"]["memory"] == ["additive", "nested"]
    assert report["failures"] == []


def test_builtin_plugins_declare_the_kinds_they_provide():
    for module, kinds in registry.BUILTIN_PLUGINS.items():
        plugin = importlib.import_module(module)
        implemented = tuple(k for k, hook in hookspecs.HOOKS.items() if hasattr(plugin, hook))
        assert implemented == kinds, module


BOTH_KINDS_PLUGIN = """
import nestrnn
from nestrnn.memory import AdditiveMemory

@nestrnn.hookimpl
def register_memories(register):
    register("both_kinds_memory", AdditiveMemory)

@nestrnn.hookimpl
def register_tasks(register):
    raise RuntimeError("the task hook was called")
"""


def test_each_kind_calls_its_hooks_on_first_use(plugin_path, monkeypatch):
    make_distribution(plugin_path, "nestrnn-both", "both_plugin", BOTH_KINDS_PLUGIN, "both")
    discovered = []
    entry_points = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda **selection: discovered.append(selection) or entry_points(**selection),
    )
    reg = registry.get_registry()
    assert "both_kinds_memory" in reg.names("memory")
    assert reg.failures == []  # the task hook has not been called
    assert "nestrnn.tasks" not in [p.plugin for p in reg.plugins]
    assert "ptb_char" in reg.names("task")
    assert [f.provider.plugin for f in reg.failures] == ["both"]
    assert reg.failures[0].error == "register_tasks: RuntimeError: the task hook was called"
    assert "ptb_char" in nestrnn.task_names() and len(reg.failures) == 1  # each hook called once
    assert len(discovered) == 1
    with pytest.raises(ValueError, match="unknown kind 'memories'; expected one of memory, task"):
        reg.load("memories")


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


MISSPELLED_PLUGIN = """
import nestrnn
from nestrnn.memory import AdditiveMemory

@nestrnn.hookimpl
def register_memory(register):
    register("spelled", AdditiveMemory)
"""


def test_a_misspelled_hook_is_reported(plugin_path):
    make_distribution(plugin_path, "nestrnn-typo", "typo_plugin", MISSPELLED_PLUGIN, "typo")
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    with pytest.raises(registry.RegistryError) as error:
        nestrnn.NestedLSTM(2, 3, memory="spelled")
    assert "unknown memory 'spelled'" in str(error.value)
    assert "(plugins with errors: typo; see `nestrnn plugins`)" in str(error.value)
    nestrnn.NestedLSTM(2, 3, memory="doubling")  # the others still work
    (failure,) = registry.get_registry().report()["failures"]
    assert failure["name"] == "typo" and failure["distribution"] == "nestrnn-typo"
    assert failure["error"] == (
        "implements no hook called register_memory; the hooks are register_memories, "
        "register_tasks, register_loggers"
    )


def test_duplicate_names_are_an_error_naming_both_providers(plugin_path):
    make_distribution(plugin_path, "nestrnn-doubling", "doubling_plugin", GOOD_PLUGIN, "doubling")
    make_distribution(plugin_path, "nestrnn-dup", "dup_plugin", DUPLICATE_PLUGIN, "dup")
    with pytest.raises(registry.RegistryError) as error:
        nestrnn.NestedLSTM(2, 3, memory="doubling")
    assert "nestrnn-doubling" in str(error.value) and "nestrnn-dup" in str(error.value)
    assert str(error.value).endswith(
        f"uninstall one of them, or set {registry.DISABLE_ENV}=1 to load the built-ins only"
    )
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

    layer = nestrnn.NestedLSTM(2, 3, memory="halving_test")
    assert isinstance(layer.memory_l0, Halving)
    out, (h, c) = layer(torch.randn(4, 1, 2))
    assert c.shape == (1, 1, 3)
    registry.reset_registry()  # script registrations survive a rebuild
    assert "halving_test" in nestrnn.memory_names()


def lookup(name: str) -> object:
    """The factory registered as memory ``name``, or the error's message."""
    try:
        return registry.get_memory(name).factory
    except registry.RegistryError as error:
        return str(error)


def lookup_before_and_after_rebuild(name: str) -> object:
    """``lookup(name)`` in the registry as it is, checked to be the same in a rebuilt one."""
    live = lookup(name)
    registry.reset_registry()
    assert lookup(name) == live
    return live


BUILT_FIRST = pytest.mark.parametrize(
    "built_first", [True, False], ids=["registry built before", "registry built after"]
)


@BUILT_FIRST
def test_a_script_may_not_take_a_name_another_definition_registered(fresh_registry, built_first):
    if built_first:
        nestrnn.memory_names()

    @nestrnn.register_memory("twice_test")
    class First(AdditiveMemory):
        pass

    with pytest.raises(registry.RegistryError) as error:

        @nestrnn.register_memory("twice_test")
        class Second(AdditiveMemory):
            pass

    assert str(error.value) == (
        f"memory name 'twice_test' is already registered by {__name__}.{First.__qualname__}; "
        f"register {__name__}.{First.__qualname__.replace('First', 'Second')} under another "
        "name, or with register_memory('twice_test', replace=True) to replace it"
    )
    assert lookup_before_and_after_rebuild("twice_test") is First


@BUILT_FIRST
def test_replace_gives_the_name_to_the_later_definition(fresh_registry, built_first):
    if built_first:
        nestrnn.memory_names()

    @nestrnn.register_memory("replaced_test")
    class First(AdditiveMemory):
        pass

    @nestrnn.register_memory("replaced_test", replace=True)
    class Second(AdditiveMemory):
        pass

    assert lookup_before_and_after_rebuild("replaced_test") is Second


@BUILT_FIRST
def test_running_a_definition_again_replaces_it(fresh_registry, built_first):
    """A re-run notebook cell or a reloaded module defines the same class again."""
    if built_first:
        nestrnn.memory_names()

    def define() -> type:
        @nestrnn.register_memory("rerun_test")
        class Rerun(AdditiveMemory):
            pass

        return Rerun

    first = define()
    again = define()
    assert again is not first
    assert lookup_before_and_after_rebuild("rerun_test") is again


@BUILT_FIRST
def test_a_script_taking_a_plugins_name_conflicts_unless_it_replaces(fresh_registry, built_first):
    if built_first:
        nestrnn.memory_names()

    @nestrnn.register_memory("additive")
    class Mine(AdditiveMemory):
        pass

    message = lookup_before_and_after_rebuild("additive")
    assert message.startswith(
        "memory name 'additive' is registered by more than one provider: plugin "
        f"'nestrnn.memory.builtin' from nestrnn {nestrnn.__version__} and {__name__}."
    )
    assert message.endswith(
        "register yours under another name, or with register_memory('additive', replace=True) "
        "to override the others"
    )
    nestrnn.register_memory("additive", replace=True)(Mine)
    assert lookup_before_and_after_rebuild("additive") is Mine


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
