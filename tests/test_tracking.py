"""Tracked runs: TensorBoard event files (read back with TensorBoard's own reader), resumed runs
that append, TensorBoard missing, and loggers from plugins (one that fails is disabled)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers_tasks import TINY, main_cli

from nestrnn import registry
from nestrnn.config import ConfigError, load_config
from nestrnn.engine import rundir as rd
from nestrnn.engine.trainer import Trainer

#: a tiny adding-problem run: 2 epochs of 4 steps, a record every 2 steps
SMALL = [
    *TINY,
    "task.name=adding",
    "task.length=8",
    "task.valid_size=16",
    "task.test_size=16",
    "train.batch_size=8",
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.log_every=2",
]


def tiny_config(*extra: str):
    return load_config([], [*SMALL, *extra])


def scalars(run_dir: Path) -> dict[str, list[int]]:
    """Each scalar tag's steps, as TensorBoard reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams(run_dir: Path) -> dict[str, bytes]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.PluginTagToContent("hparams")


def test_tensorboard_holds_scalars_hparams_and_timescales(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    Trainer(tiny_config("log.tensorboard=true"), run_dir, echo=None).fit()
    tags = scalars(run_dir)
    assert tags["train/mse"] == [2, 4, 6, 8]
    assert tags["train/lr"] == [2, 4, 6, 8] and tags["train/grad_norm"] == [2, 4, 6, 8]
    assert tags["valid/mse"] == [4, 8] and tags["valid/error"] == [4, 8]
    assert tags["timescale/outer_c0"] == [4, 8] and tags["timescale/inner_c1"] == [4, 8]
    assert tags["test/mse"] == [8] and tags["best/mse"] == [8]
    content = hparams(run_dir)
    assert b"optim.lr" in content["_hparams_/experiment"]
    assert b"best/mse" in content["_hparams_/experiment"]
    assert b"model.depth" in content["_hparams_/session_start_info"]
    # metrics.jsonl is what it always was: no timescales, the same events
    events = [r["event"] for r in rd.read_records(run_dir / rd.METRICS)]
    assert events == ["train", "train", "epoch", "train", "train", "epoch", "test"]


def test_no_timescales_when_switched_off(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    config = tiny_config("log.tensorboard=true", "log.timescales=false", "train.epochs=1")
    Trainer(config, run_dir, echo=None).fit()
    tags = scalars(run_dir)
    assert "valid/mse" in tags and not [t for t in tags if t.startswith("timescale/")]


def test_a_resumed_run_appends_without_duplicated_points(tmp_path: Path) -> None:
    """A run killed after its epoch-1 checkpoint had already written steps 5-8: resumed from
    step 4, TensorBoard shows each step once."""
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    config = tiny_config("log.tensorboard=true")
    Trainer(config, run_dir, echo=None).fit(stop_at=4)
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in (rd.LAST, rd.LAST + rd.SUM_SUFFIX):
        shutil.copy2(run_dir / name, kept / name)
    Trainer(config, run_dir, resume=True, echo=None).fit()
    for name in (rd.LAST, rd.LAST + rd.SUM_SUFFIX):  # the epoch-1 checkpoint, as after a kill
        shutil.copy2(kept / name, run_dir / name)
    summary = Trainer(config, run_dir, resume=True, echo=None).fit()
    assert summary.reason == "completed" and summary.steps == 8
    tags = scalars(run_dir)
    assert tags["train/mse"] == [2, 4, 6, 8]
    assert tags["valid/mse"] == [4, 8]
    assert tags["timescale/outer_c0"] == [4, 8]
    assert tags["test/mse"] == [8] and tags["best/mse"] == [8]


def test_tensorboard_missing_is_one_line_error_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process as if TensorBoard were not installed: ``import tensorboard`` fails, and
    torch's module that imports it is imported afresh."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    run_dir = tmp_path / "run"
    code, _, err = main_cli(
        ["train", *SMALL, "log.tensorboard=true", "--run-dir", str(run_dir)], capsys
    )
    assert code == 2, err
    assert err.strip().splitlines() == [
        "nestrnn train: error: log.tensorboard=true needs the tensorboard package: "
        "pip install 'nestrnn[tensorboard]'"
    ]
    assert not run_dir.exists()


LOGGER_PLUGIN = """
import json
import os

import nestrnn
from nestrnn.engine.tracking import Logger


class Recorder(Logger):
    "writes what it receives to $RECORDER_FILE"

    def start(self, config, run_dir, step=0):
        self.out = open(os.environ["RECORDER_FILE"], "a")
        self.out.write(json.dumps(["start", step]) + "\\n")

    def log_metrics(self, step, metrics, split):
        self.out.write(json.dumps(["metrics", step, split]) + "\\n")

    def log_timescales(self, step, timescales):
        self.out.write(json.dumps(["timescales", step, sorted(timescales)]) + "\\n")

    def close(self):
        self.out.write(json.dumps(["close"]) + "\\n")
        self.out.close()


class Broken(Logger):
    "a dashboard whose server went away"

    def log_metrics(self, step, metrics, split):
        raise ConnectionError("the tracking server is down")


@nestrnn.hookimpl
def register_loggers(register):
    register("recorder", Recorder)
    register("broken", Broken)
"""


@pytest.fixture
def logger_plugin(tmp_path, monkeypatch):
    """An installed distribution whose plugin registers the loggers recorder and broken."""
    from test_registry import make_distribution

    kept = list(registry._script_entries)
    registry.reset_registry()
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    make_distribution(root, "nestrnn-loggers", "loggers_plugin", LOGGER_PLUGIN, "loggers")
    recorded = tmp_path / "recorded.jsonl"
    monkeypatch.setenv("RECORDER_FILE", str(recorded))
    yield recorded
    registry._script_entries[:] = kept
    registry.reset_registry()


def test_a_failing_plugin_logger_is_reported_once_and_disabled(
    tmp_path: Path, logger_plugin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config("log.loggers=[broken,recorder]")
    summary = Trainer(config, tmp_path / "run", echo=None).fit()
    assert summary.reason == "completed"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "broken" in line]
    assert warnings == [
        "warning: logger 'broken' failed (log_metrics: ConnectionError: the tracking server is "
        "down); it is disabled for the rest of the run"
    ]
    calls = [json.loads(line) for line in logger_plugin.read_text().splitlines()]
    assert calls[0] == ["start", 0] and calls[-1] == ["close"]
    assert ["metrics", 8, "test"] in calls and ["metrics", 4, "valid"] in calls
    assert ["timescales", 4, ["inner c1", "outer c0"]] in calls


def test_plugin_loggers_are_listed_and_unknown_names_refused(
    tmp_path: Path, logger_plugin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = main_cli(["plugins"], capsys)
    assert code == 0 and "    logger: broken, recorder" in out.splitlines()
    with pytest.raises(
        ConfigError,
        match="log.loggers: unknown logger 'wandb'; known logger names: broken, recorder",
    ):
        Trainer(tiny_config("log.loggers=[wandb]"), tmp_path / "run", echo=None)
    assert not (tmp_path / "run").exists()


def test_timescales_that_cannot_be_measured_are_left_out_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model ``record_cells`` cannot step (a task plugin's own) costs the timescales, not the run."""
    pytest.importorskip("tensorboard")
    from nestrnn import analysis

    def refuse(*args, **kwargs):
        raise ValueError("a bidirectional model cannot be stepped one step at a time")

    monkeypatch.setattr(analysis, "record_cells", refuse)
    run_dir = tmp_path / "run"
    summary = Trainer(tiny_config("log.tensorboard=true"), run_dir, echo=None).fit()
    assert summary.reason == "completed"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "timescales" in line]
    assert len(warnings) == 1 and "bidirectional" in warnings[0]
    tags = scalars(run_dir)
    assert tags["valid/mse"] == [4, 8] and not [t for t in tags if t.startswith("timescale/")]
