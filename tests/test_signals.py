"""Signals a single ``nestrnn train`` process meets: SIGHUP (a closed terminal), a SIGTERM during
an evaluation (the validation after an epoch, the final test), and output into a pipe (nohup,
tee, a scheduler's log) that must show each line when it is printed.

Every test starts a real process and sends it a real signal; ``tests/faults.py slow-eval`` makes
an evaluation slow enough to be caught in the middle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from faults import EVALUATING
from helpers_tasks import TINY, main_cli, start_cli, train_steps, wait_for_step

from nestrnn.engine import rundir as rd

FAULTS = str(Path(__file__).with_name("faults.py"))

#: 2 epochs x 3 steps of the adding problem; 8 validation and 8 test batches of 8
SHORT = [
    *TINY,
    "task.length=6",
    "task.valid_size=64",
    "task.test_size=64",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=8",
]
#: a run that lasts until it is stopped
ENDLESS = [*SHORT, "train.epochs=1", "train.steps_per_epoch=10000000"]


def _position(run: Path) -> dict[str, int]:
    return rd.load_checkpoint(run / rd.LAST)["position"]


def _with_fault(fault: str, args: list[str]) -> subprocess.Popen[str]:
    """``nestrnn train ARGS`` through tests/faults.py (stdout and stderr piped)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, FAULTS, fault, "--", "train", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _signal_at(process: subprocess.Popen[str], marker: str, signum: int) -> tuple[str, str]:
    """Send ``signum`` once ``process`` has printed a line starting with ``marker`` on stderr;
    its output (stdout, stderr)."""
    try:
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.startswith(marker):
                process.send_signal(signum)
                break
        else:
            raise AssertionError(f"no {marker!r} line: {''.join(seen)}")
        out, err = process.communicate(timeout=90)
    finally:
        process.kill()
    return out, "".join(seen) + err


def test_sighup_saves_the_current_step_like_sigterm(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) stops a run as SIGTERM does: last.pt at the current step, a
    "stopped" record, exit status 129."""
    run = tmp_path / "run"
    writer = start_cli(["train", *ENDLESS, "--run-dir", str(run)])
    try:
        wait_for_step(run, 3, writer)
        writer.send_signal(signal.SIGHUP)
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 128 + signal.SIGHUP, err
    step = _position(run)["global_step"]
    assert f"stopped by SIGHUP after step {step}" in err and "Traceback" not in err
    assert train_steps(run) == list(range(1, step + 1))
    assert rd.RunDir(run).records()[-1] == {
        "event": "stopped",
        "step": step,
        "epoch": 1,
        "signal": "SIGHUP",
    }


def test_sighup_stays_ignored_under_nohup(tmp_path: Path) -> None:
    """``nohup nestrnn train``: the SIGHUP the user asked to ignore does not stop the run."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    writer = subprocess.Popen(
        ["nohup", sys.executable, "-m", "nestrnn", "train", *ENDLESS, "--run-dir", str(run)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_step(run, 3, writer)
        writer.send_signal(signal.SIGHUP)
        wait_for_step(run, max(train_steps(run)) + 3, writer)  # still training
        writer.send_signal(signal.SIGTERM)
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 128 + signal.SIGTERM, err
    assert rd.RunDir(run).records()[-1]["signal"] == "SIGTERM"


def test_sigterm_during_the_final_test_stops_it(tmp_path: Path, capsys) -> None:
    """The checkpoints are complete: the test is abandoned (no test record), exit status 143, and
    stderr says how to get the test result, which `nestrnn eval` then gives."""
    run = tmp_path / "run"
    process = _with_fault("slow-eval:test:1", [*SHORT, "--run-dir", str(run)])
    _, err = _signal_at(process, f"{EVALUATING} test", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM during the final test" in err
    assert f"nestrnn eval {run} --split test" in err
    records = rd.RunDir(run).records()
    assert "test" not in [r["event"] for r in records]
    assert records[-1] == {
        "event": "stopped",
        "step": 6,
        "epoch": 2,
        "signal": "SIGTERM",
        "during": "test",
    }
    summary = json.loads((run / rd.SUMMARY).read_text())
    assert summary["steps"] == 6 and summary["test"] == {}
    code, out, err = main_cli(["eval", str(run), "--split", "test"], capsys)
    assert code == 0 and "test (best.pt, step 6): mse" in out, err


def test_sigterm_during_validation_stops_it_and_the_resume_is_exact(tmp_path: Path, capsys) -> None:
    """A signal during the validation after an epoch stops the run there (no further training
    step); last.pt holds the epoch's end, and the resumed run validates it again and ends as an
    uninterrupted run does."""
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    process = _with_fault("slow-eval:valid:1", [*SHORT, "--run-dir", str(cut)])
    _, err = _signal_at(process, f"{EVALUATING} valid", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step 3" in err and "Traceback" not in err
    assert _position(cut) == {"epoch": 0, "step_in_epoch": 3, "global_step": 3}
    assert train_steps(cut) == [1, 2, 3]
    assert main_cli(["train", "--resume", str(cut)], capsys)[0] == 0
    assert main_cli(["train", *SHORT, "--run-dir", str(whole)], capsys)[0] == 0

    def outcome(run: Path) -> list[dict]:
        return [r for r in rd.RunDir(run).records() if r["event"] in ("train", "epoch", "test")]

    assert outcome(cut) == outcome(whole)


def test_epoch_lines_reach_a_pipe_when_they_are_printed(tmp_path: Path) -> None:
    """stdout into a pipe (no PYTHONUNBUFFERED): the first epoch's line is there while the run
    goes on (epochs of seconds: a block buffer would hold the line for minutes)."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [
        sys.executable,
        FAULTS,
        "slow-eval:valid:0.5",
        "--",
        "train",
        *SHORT,
        "train.epochs=1000",
        "--run-dir",
        str(run),
    ]
    process = subprocess.Popen(
        command,
        env=dict(env, OMP_NUM_THREADS="1"),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(90, process.kill)  # a line that never comes ends the test
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("epoch"):
                break
        running = process.poll() is None
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        process.kill()
    assert lines and lines[-1].startswith("epoch    1/1000 |"), "".join(lines) + err
    assert running, "the epoch line came only when the process ended"
    assert process.returncode == 128 + signal.SIGTERM, err
