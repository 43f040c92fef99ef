"""Installed plugins that misbehave as they load: print, hang, raise BaseException, look names up.

Each plugin is a real module with a real ``nestrnn`` entry point (a dist-info folder on
``PYTHONPATH``), met through the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers_tasks import TINY, run_cli


def install(site: Path, dist: str, modules: dict[str, str]) -> dict[str, str]:
    """A distribution ``dist`` in ``site`` whose modules are each a ``nestrnn`` entry point named
    after the module; the environment that sees it."""
    site.mkdir(exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    entries = "".join(f"{module} = {module}\n" for module in modules)
    (info / "entry_points.txt").write_text(f"[nestrnn]\n{entries}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    return {"PYTHONPATH": str(site)}


NOISY = """
import os
import sys

import nestrnn
from nestrnn.memory import AdditiveMemory

print("noise from print")
sys.stdout.write("noise from sys.stdout\\n")
os.write(1, b"noise from fd 1\\n")


class Loud(AdditiveMemory):
    "the additive memory, printing as it runs"

    def forward(self, gated_cell, gated_input, state):
        os.write(1, b"noise from forward\\n")
        return super().forward(gated_cell, gated_input, state)


@nestrnn.hookimpl
def register_memories(register):
    print("noise from a hook")
    register("loud", Loud)
"""


def test_what_a_plugin_prints_goes_to_stderr_and_json_stays_valid(tmp_path):
    env = install(tmp_path / "site", "nestrnn-noisy", {"noisy": NOISY})
    for command in ("plugins", "tasks"):
        result = run_cli([command, "--json"], tmp_path, env)
        assert result.returncode == 0, result.stderr
        json.loads(result.stdout)  # nothing but the JSON
        for where in ("print", "sys.stdout", "fd 1"):
            assert f"noise from {where}" in result.stderr
    listing = run_cli(["memories"], tmp_path, env)
    assert "noise" not in listing.stdout and "loud" in listing.stdout
    assert "noise from a hook" in listing.stderr


HANGING = """
import pathlib
import time

pathlib.Path(__file__).with_name("hang_started").touch()
time.sleep(3600)
"""


def test_a_plugin_that_hangs_at_import_is_skipped_after_the_timeout(tmp_path):
    env = install(tmp_path / "site", "nestrnn-hanging", {"hang": HANGING})
    env["NESTRNN_PLUGIN_TIMEOUT"] = "2"
    plugins = run_cli(["plugins"], tmp_path, env, timeout=60)
    assert plugins.returncode == 0, plugins.stderr
    assert "FAILED hang [nestrnn-hanging]: timed out: its import did not finish within 2 s" in (
        plugins.stdout
    )
    tasks = run_cli(["tasks"], tmp_path, env, timeout=60)
    assert tasks.returncode == 0, tasks.stderr
    assert "ptb_char" in tasks.stdout and "1 plugin(s) failed to load" in tasks.stdout
    assert (
        "warning: plugin 'hang' from nestrnn-hanging 1.0 timed out: its import did not finish "
        "within 2 s (set NESTRNN_PLUGIN_TIMEOUT to wait longer); skipping it"
    ) in tasks.stderr.splitlines()


@pytest.mark.slow
def test_train_and_eval_run_with_a_hanging_plugin_and_a_noisy_memory(tmp_path):
    env = install(tmp_path / "site", "nestrnn-faulty", {"hang": HANGING, "noisy": NOISY})
    env["NESTRNN_PLUGIN_TIMEOUT"] = "2"
    train = [
        *TINY,
        "model.memory=loud",
        "task.length=6",
        "task.valid_size=16",
        "task.test_size=16",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.batch_size=4",
        "--run-dir",
        "run",
    ]
    trained = run_cli(["train", *train], tmp_path, env, timeout=300)
    assert trained.returncode == 0, trained.stderr
    assert "finished (completed)" in trained.stdout and "plugin 'hang'" in trained.stderr
    evaluated = run_cli(["eval", "run", "--json"], tmp_path, env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "mse" in json.loads(evaluated.stdout)["metrics"]
    assert "noise from forward" in evaluated.stderr


def test_ctrl_c_while_a_plugin_hangs_stops_the_command(tmp_path):
    env = {**os.environ, **install(tmp_path / "site", "nestrnn-hanging", {"hang": HANGING})}
    env["NESTRNN_PLUGIN_TIMEOUT"] = "600"
    process = subprocess.Popen(
        [sys.executable, "-m", "nestrnn.cli", "plugins"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "site" / "hang_started").exists():
            assert process.poll() is None and time.monotonic() < deadline, "the plugin never ran"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "nestrnn plugins: interrupted"


BASE_EXCEPTIONS = {
    "interrupting": "raise KeyboardInterrupt\n",
    "exiting": "raise SystemExit('no GPU')\n",
    "odd": "class Odd(BaseException):\n    pass\n\nraise Odd('not an Exception')\n",
    "interrupting_hook": """
        import nestrnn

        @nestrnn.hookimpl
        def register_tasks(register):
            raise KeyboardInterrupt
    """,
}


def test_a_plugin_raising_base_exceptions_is_reported_and_the_command_runs(tmp_path):
    env = install(tmp_path / "site", "nestrnn-raising", BASE_EXCEPTIONS)
    result = run_cli(["plugins", "--json"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    errors = {f["name"]: f["error"] for f in json.loads(result.stdout)["failures"]}
    assert errors == {
        "interrupting": "KeyboardInterrupt",
        "exiting": "SystemExit: the plugin called sys.exit('no GPU')",
        "odd": "Odd: not an Exception",
        "interrupting_hook": "register_tasks: KeyboardInterrupt",
    }
    tasks = run_cli(["tasks"], tmp_path, env)
    assert tasks.returncode == 0 and "ptb_char" in tasks.stdout, tasks.stderr


LOOKING_UP = """
import nestrnn
from nestrnn.memory import AdditiveMemory

KNOWN = nestrnn.memory_names()  # a lookup while this plugin loads


@nestrnn.hookimpl
def register_memories(register):
    register("additive_again", AdditiveMemory, f"known: {len(nestrnn.task_names())} tasks")
"""


def test_a_plugin_looking_names_up_while_it_loads_does_not_wait_for_itself(tmp_path):
    env = install(tmp_path / "site", "nestrnn-lookup", {"lookup": LOOKING_UP})
    env["NESTRNN_PLUGIN_TIMEOUT"] = "30"
    result = run_cli(["plugins", "--json"], tmp_path, env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["failures"] == []
    (lookup,) = [p for p in report["plugins"] if p["name"] == "lookup"]
    assert lookup["registered"]["memory"] == ["additive_again"]


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_plugin_timeout_is_a_one_line_error(tmp_path, value):
    result = run_cli(["tasks"], tmp_path, {"NESTRNN_PLUGIN_TIMEOUT": value})
    assert result.returncode == 2
    assert result.stderr == (
        f"nestrnn tasks: error: NESTRNN_PLUGIN_TIMEOUT must be a positive number of seconds, "
        f"got {value!r}\n"
    )
