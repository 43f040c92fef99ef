"""``nestrnn sweep``: spec errors, an end-to-end sweep with two workers, a worker killed with
SIGKILL and the sweep run again, a diverging trial, pruning. Tiny adding-task runs. The command
runs in this process where it is not the one killed: its second worker and every training run
are subprocesses as always."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers_tasks import main_cli

optuna = pytest.importorskip("optuna")

from nestrnn.cli import main  # noqa: E402

TINY = {
    "task.length": 5,
    "task.valid_size": 16,
    "task.test_size": 16,
    "model.hidden_size": 4,
    "model.backend": "naive",
    "train.epochs": 2,
    "train.steps_per_epoch": 2,
    "train.batch_size": 8,
}


def write_spec(path: Path, **spec: object) -> Path:
    spec["overrides"] = {**TINY, **spec.get("overrides", {})}  # type: ignore[dict-item]
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``nestrnn sweep ARGS`` in this process: (exit status, stdout, stderr)."""
    return main_cli(["sweep", *args], capsys)


def trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir}/study.db")
    return study.get_trials()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "space, extra, message",
    [
        (
            {"optim.lrr": {"float": [0.001, 0.01]}},
            {},
            "space.optim.lrr: unknown config key; did you mean 'optim.lr'?",
        ),
        ({"optim.lr": {"float": [0.01, 0.001]}}, {}, "space.optim.lr: float needs [low, high]"),
        ({"model.family": {"choice": []}}, {}, "space.model.family: choice needs a non-empty"),
        ({"model.family": {"choice": ["nlstm", "gruu"]}}, {}, "value 'gruu'"),
        ({"optim.lr": {"float": [0.001, 0.01]}}, {"sampler": "bayes"}, "sampler: must be one of"),
        ({"memory": {"memories": ["nested", "nope"]}}, {}, "space.memory.memories[1]:"),
        ({"memory": {"memories": [{"name": "additive", "depth": 3}]}}, {}, "takes no depth"),
        ({"memory": "all", "model.depth": {"int": [2, 3]}}, {}, "space.model.depth: the memory"),
        (
            {"memory": {"memories": [{"name": "nested", "cell_activation": "tanhh"}]}},
            {},
            "space.memory.memories[0]:",
        ),
        (
            {"optim.lr": {"float": [0.001, 0.01]}},
            {"pruner": {"name": "median", "warmup": 1}},
            "pruner: median:",
        ),
    ],
)
def test_spec_errors_are_one_line_and_write_nothing(tmp_path, capsys, space, extra, message):
    spec = write_spec(tmp_path / "spec.yaml", space=space, **extra)
    assert main(["sweep", str(spec), "--dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestrnn sweep: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_overrides_may_come_before_the_spec(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", space={"optim.lr": {"float": [1e-3, 1e-2]}})
    argv = ["sweep", "train.epochs=oops", "--dir", str(tmp_path / "out"), str(spec)]
    assert main(argv) == 2
    assert "config key 'train.epochs' must be an integer" in capsys.readouterr().err


def test_memory_all_expands_to_every_memory_at_depths_2_and_3(tmp_path):
    from nestrnn.sweep.spec import load_spec

    spec = load_spec(write_spec(tmp_path / "s.yaml", space={"memory": "all"}), [])
    assert {"nested-d2", "nested-d3", "additive"} <= set(spec.memories)
    assert spec.memories["nested-d3"]["model.depth"] == 3
    choices = [{"name": "nested", "depth": 3, "cell_activation": "softsign"}, "lstm"]
    spec = load_spec(write_spec(tmp_path / "s.yaml", space={"memory": {"memories": choices}}), [])
    config = spec.config({"memory": "nested-d3-cell_activation=softsign"}, seed=1, threads=1)
    assert config.model.memory == {"name": "nested", "cell_activation": "softsign", "depth": 3}
    assert spec.config({"memory": "lstm"}, seed=1, threads=1).model.family == "lstm"


@pytest.mark.slow
def test_a_relative_base_is_found_beside_the_spec(tmp_path, monkeypatch):
    from nestrnn.sweep.spec import load_spec

    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "base.yaml").write_text("optim:\n  grad_clip: 0.3\n")
    spec = write_spec(folder / "s.yaml", base="base.yaml", space={"optim.lr": {"choice": [0.01]}})
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    loaded = load_spec(spec, [])
    assert loaded.config({"optim.lr": 0.01}, seed=0, threads=1).optim.grad_clip == 0.3


def test_two_workers_two_trials_two_seeds(tmp_path, capsys):
    spec = write_spec(
        tmp_path / "spec.yaml",
        space={"optim.lr": {"float": [1e-3, 1e-2], "log": True}},
        sampler="random",
        trials=2,
        seeds=[0, 1],
    )
    out = tmp_path / "sw"
    code, stdout, stderr = sweep(
        capsys, str(spec), "--dir", str(out), "--workers", "2", "train.log_every=1"
    )
    assert code == 0, stderr
    assert "best: trial" in stdout and (out / "best.yaml").is_file()
    done = trials(out)
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 2
    runs = sorted(p.name for p in (out / "trials").iterdir())
    assert runs == ["0000-seed0", "0000-seed1", "0001-seed0", "0001-seed1"]
    configs = {r: yaml.safe_load((out / "trials" / r / "config.yaml").read_text()) for r in runs}
    for r, config in configs.items():  # each run trained once: one test record
        assert [x["event"] for x in records(out / "trials" / r)].count("test") == 1
        assert config["train"]["seed"] == int(r[-1]) and config["train"]["log_every"] == 1
    a, b = configs["0000-seed0"], configs["0001-seed1"]
    diff = {(s, k) for s in a for k in a[s] if a[s][k] != b[s][k]}
    assert diff == {("optim", "lr"), ("train", "seed")}
    for t in done:
        assert t.value == pytest.approx((t.user_attrs["seed0"] + t.user_attrs["seed1"]) / 2)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_in_the_same_run_directory(tmp_path, capsys):
    spec = write_spec(
        tmp_path / "spec.yaml",
        space={"optim.lr": {"choice": [0.005]}},
        trials=1,
        heartbeat_s=1,
        overrides={"train.epochs": 150, "train.steps_per_epoch": 1},
    )
    out = tmp_path / "sw"
    run = out / "trials" / "0000-seed0"
    worker = subprocess.Popen(
        [sys.executable, "-m", "nestrnn", "sweep", str(spec), "--dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and worker.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # the run gets SIGTERM as its parent dies: it saves last.pt and stops
    while not any(r["event"] == "stopped" for r in records(run)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    code, _, stderr = sweep(capsys, str(spec), "--dir", str(out))
    assert code == 0, stderr
    states = [(t.state, t.user_attrs.get("runs")) for t in trials(out)]
    assert states == [(optuna.trial.TrialState.FAIL, 0), (optuna.trial.TrialState.COMPLETE, 0)]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000-seed0"]
    assert "resuming at epoch" in (out / "logs" / "0000-seed0.log").read_text()
    epochs = [r["epoch"] for r in records(run) if r["event"] == "epoch"]
    assert epochs == list(range(1, 151))  # every epoch once: resumed, not trained again


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_pruning_stops_a_run(tmp_path, capsys):
    """lr=1000 (plain SGD, no clipping) overflows in epoch 1: failed with the reason, the sweep
    goes on; the other trial is pruned at its first validation record (mse > 0) and its run
    stops early."""
    spec = write_spec(
        tmp_path / "spec.yaml",
        space={"optim.lr": {"choice": [1000, 0.005]}},
        sampler="grid",
        pruner={"name": "threshold", "upper": 0.0},
        overrides={
            "optim.name": "sgd",
            "optim.grad_clip": 0,
            "train.steps_per_epoch": 10,
            "train.epochs": 200,
        },
    )
    out = tmp_path / "sw"
    code, stdout, stderr = sweep(capsys, str(spec), "--dir", str(out))
    assert code == 0, stderr
    done = {t.params["optim.lr"]: t for t in trials(out)}
    assert done[1000].state == optuna.trial.TrialState.FAIL
    assert "diverged: loss inf" in done[1000].user_attrs["fail_reason"]
    assert "diverged" in stdout and "no trial completed" in stdout
    assert done[0.005].state == optuna.trial.TrialState.PRUNED
    run = out / "trials" / f"{done[0.005].number:04d}-seed0"
    events = [r["event"] for r in records(run)]
    assert events[-1] == "stopped" and events.count("epoch") < 200
