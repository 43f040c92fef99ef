"""Run directories and processes that can be trusted: one run per directory, one writer at a time,
clean stops on SIGTERM and SIGINT, torn or leftover files, full disks, read-only folders, file
modes, and a data set that changed under a run.

What is about processes (signals, locks held by a running writer, a full disk) uses real
processes (``python -m nestrnn``); the rest runs ``nestrnn.cli.main`` in this process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_tasks import (
    TINY,
    assert_one_line_error,
    main_cli,
    run_cli,
    snapshot,
    start_cli,
    train_steps,
    wait_for_step,
    write_text,
)

from nestrnn.engine import rundir as rd

#: a whole run of 2 epochs x 3 steps, a few seconds
SHORT = [
    *TINY,
    "task.length=6",
    "task.valid_size=16",
    "task.test_size=16",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=8",
]
#: a run that lasts until it is stopped (no checkpoint before the epoch ends)
ENDLESS = [*SHORT, "train.epochs=1", "train.steps_per_epoch=10000000"]


def _last_step(run_dir: Path) -> int:
    return rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"]


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in rd.RunDir(run_dir).records() if r["event"] == "train"]


def test_a_new_run_never_replaces_a_run(tmp_path: Path, capsys) -> None:
    """The same job started twice: the second one is refused and changes nothing; --overwrite
    replaces the run (nothing of the first one is mixed in); resuming a finished run is a no-op."""
    first = run_cli(["train", *SHORT, "--run-dir", "run"], tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    before = snapshot(run)
    again = run_cli(["train", *SHORT, "--run-dir", "run"], tmp_path)
    assert_one_line_error(again.returncode, again.stderr, "train")
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert snapshot(run) == before

    for argv in (["--resume", str(run)], ["--resume", "auto", "--run-dir", str(run)]):
        code, out, err = main_cli(["train", *argv], capsys)
        assert code == 0 and "nothing to do" in out, err
        assert snapshot(run) == before  # no second "test" record, no rewritten summary

    code, _, err = main_cli(["train", *SHORT, "--run-dir", str(run), "--overwrite"], capsys)
    assert code == 0, err
    assert [r["step"] for r in _train_records(run)] == list(range(1, 7))
    assert [r["event"] for r in rd.RunDir(run).records()].count("test") == 1


def test_one_writer_at_a_time_and_sigterm_saves_the_current_step(tmp_path: Path, capsys) -> None:
    """While a run is being written, no other process may train it, resume it or replace it;
    SIGTERM stops it at the end of a step with last.pt saved there and exit status 143."""
    run = tmp_path / "run"
    writer = start_cli(["train", *ENDLESS, "--run-dir", str(run)])
    try:
        wait_for_step(run, 3, writer)
        for argv in (
            ["train", *SHORT, "--run-dir", str(run)],
            ["train", *SHORT, "--run-dir", str(run), "--overwrite"],
            ["train", "--resume", str(run)],
            ["train", "--resume", "auto", "--run-dir", str(run)],
        ):
            code, _, err = main_cli(argv, capsys)
            assert_one_line_error(code, err, "train")
            assert f"in use by another process (pid {writer.pid})" in err, argv
        writer.send_signal(signal.SIGTERM)
        out, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 128 + signal.SIGTERM, err
    step = _last_step(run)
    assert f"stopped by SIGTERM after step {step}" in err
    assert f"nestrnn train --resume {run}" in err and "Traceback" not in err
    assert train_steps(run) == list(range(1, step + 1))
    assert rd.RunDir(run).records()[-1] == {
        "event": "stopped",
        "step": step,
        "epoch": 1,
        "signal": "SIGTERM",
    }


def test_sigint_saves_the_current_step_and_the_resumed_run_is_exact(tmp_path: Path, capsys) -> None:
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    writer = start_cli(["train", *ENDLESS, "--run-dir", str(cut)])
    try:
        wait_for_step(cut, 5, writer)
        writer.send_signal(signal.SIGINT)
        _, err = writer.communicate(timeout=60)
    finally:
        writer.kill()
    assert writer.returncode == 128 + signal.SIGINT, err
    step = _last_step(cut)
    assert f"stopped by SIGINT after step {step}" in err
    more = [f"train.max_steps={step + 3}"]
    assert main_cli(["train", "--resume", str(cut), *more], capsys)[0] == 0
    assert main_cli(["train", *ENDLESS, *more, "--run-dir", str(whole)], capsys)[0] == 0
    assert _train_records(cut) == _train_records(whole)


def test_a_torn_last_line_of_metrics_does_not_stop_a_resume(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main_cli(["train", *SHORT, "train.max_steps=4", "--run-dir", str(run)], capsys)[0] == 0
    metrics = run / rd.METRICS
    with metrics.open("a") as handle:
        handle.write('{"event": "train", "epoch": 2, "st')  # power lost in the middle of a write
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert code == 0, err
    assert train_steps(run) == list(range(1, 7))
    assert all(json.loads(line) for line in metrics.read_text().splitlines())

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    before = snapshot(run)
    code, _, err = main_cli(["train", "--resume", str(run), "train.epochs=3"], capsys)
    assert_one_line_error(code, err, "train")
    assert "metrics.jsonl, line 2 is not a JSON record" in err
    assert snapshot(run) == before


def test_resume_auto_starts_again_a_run_killed_before_its_first_checkpoint(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    writer = start_cli(["train", *ENDLESS, "--run-dir", str(run)])
    try:
        wait_for_step(run, 3, writer)
    finally:
        writer.kill()
        writer.communicate()
    assert not (run / rd.LAST).exists() and train_steps(run)
    code, _, err = main_cli(["train", *SHORT, "--run-dir", str(run)], capsys)
    assert_one_line_error(code, err, "train")
    assert "saved no checkpoint" in err
    code, _, err = main_cli(["train", *SHORT, "--resume", "auto", "--run-dir", str(run)], capsys)
    assert code == 0, err
    assert train_steps(run) == list(range(1, 7))  # the killed attempt's records are gone


def test_run_files_follow_the_umask(tmp_path: Path, capsys) -> None:
    previous = os.umask(0o027)
    try:
        assert main_cli(["train", *SHORT, "--run-dir", str(tmp_path / "run")], capsys)[0] == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert set(rd.RUN_FILES) <= set(modes)
    assert modes == dict.fromkeys(modes, 0o640)


def test_resuming_on_other_data_is_refused(tmp_path: Path, capsys) -> None:
    """The same characters in another order: the vocabulary fits, the data does not."""
    corpus = write_text(tmp_path / "corpus.txt", repeats=12)
    args = [
        *TINY,
        "task.name=text_file",
        f"task.path={corpus}",
        "train.epochs=1",
        "train.steps_per_epoch=4",
        "train.batch_size=4",
        "train.bptt=6",
    ]
    run = tmp_path / "run"
    assert main_cli(["train", *args, "train.max_steps=2", "--run-dir", str(run)], capsys)[0] == 0
    corpus.write_text("".join(reversed(corpus.read_text().splitlines(keepends=True))))
    before = snapshot(run)
    code, _, err = main_cli(["train", "--resume", str(run), "train.max_steps=0"], capsys)
    assert_one_line_error(code, err, "train")
    assert "differs from the data" in err and "--allow-data-change" in err
    assert snapshot(run) == before
    resume = ["train", "--resume", str(run), "train.max_steps=0", "--allow-data-change"]
    assert main_cli(resume, capsys)[0] == 0
    assert train_steps(run) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- full and read-only


def _file_size_limit(limit: int):
    """A preexec_fn: files of the child process may not grow beyond ``limit`` bytes (EFBIG, the
    way a full disk fails a write; Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _train_with_limit(args: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nestrnn", "train", *args],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(limit),
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = [
        *SHORT,
        "train.epochs=1",
        "train.steps_per_epoch=5000",
        "train.checkpoint_every=50",
        "--run-dir",
        str(run),
    ]
    result = _train_with_limit(args, 64 << 10)  # a checkpoint fits; metrics.jsonl outgrows it
    assert_one_line_error(result.returncode, result.stderr, "train")
    assert f"cannot write {run / rd.METRICS}: File too large" in result.stderr
    step = _last_step(run)
    assert step and step % 50 == 0 and not list(run.glob(".*.tmp"))
    more = f"train.max_steps={step + 2}"
    assert main_cli(["train", "--resume", str(run), more], capsys)[0] == 0
    assert train_steps(run) == list(range(1, step + 3))


def test_a_checkpoint_that_does_not_fit_on_the_disk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train_with_limit([*SHORT, "train.checkpoint_every=2", "--run-dir", str(run)], 8 << 10)
    assert_one_line_error(result.returncode, result.stderr, "train")
    assert f"cannot write {run / rd.LAST}: File too large" in result.stderr
    assert not (run / rd.LAST).exists() and not list(run.glob(".*.tmp"))


def _read_only_prefix(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` cannot be written: none for a user that file
    modes bind (the folder is made read-only), a read-only bind mount for root."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
        return []
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "--mount", "sh", "-c", mount, str(folder)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("root, and no mount namespace to make a folder read-only in")
    return prefix


def test_a_read_only_run_directory(tmp_path: Path, capsys) -> None:
    """eval reads a read-only run; resuming it or writing figures into it is one error line."""
    run = tmp_path / "run"
    assert main_cli(["train", *SHORT, "--run-dir", str(run)], capsys)[0] == 0
    before = snapshot(run)
    commands = [
        ["eval", str(run)],
        ["train", "--resume", str(run), "train.epochs=3"],
        ["viz", str(run), "--timescales-only", "--timescale-length", "8"],
    ]
    # one process runs the three commands and prints their exit statuses
    script = (
        f"import sys; from nestrnn.cli import main; print([main(argv) for argv in {commands!r}])"
    )
    prefix = _read_only_prefix(run)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
    finally:
        for path in [run, *run.rglob("*")]:
            path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o200)
    assert result.stdout.strip().splitlines()[-1] == "[0, 2, 2]", result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors[0].startswith(f"nestrnn train: error: cannot lock the run directory {run}: ")
    assert errors[1].startswith(f"nestrnn viz: error: cannot write {run / 'figures'}: ")
    assert len(errors) == 2
    assert snapshot(run) == before
