"""Data-parallel training under torchrun (gloo on CPU), elastic restarts, crash-safe checkpoints
and the ``--nproc`` launcher's handling of signals.

Each test starts real processes (``python -m torch.distributed.run``) on a tiny character-level
language model, so that the carried TBPTT state and the sharded streams are exercised too. Faults
are injected from the test side (``tests/faults.py`` wraps a function of the package).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import EVALUATING, PAUSED
from helpers_tasks import start_cli, wait_for_step, wait_until_gone

from nestrnn.cli import main
from nestrnn.engine import rundir as rd

FAULTS = str(Path(__file__).with_name("faults.py"))

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed is unavailable"
)

TEXT = "".join(
    f"the {w} sat on the mat and ate {n} apples.\n"
    for n in range(40)
    for w in ("cat", "dog", "owl")[n % 3 : n % 3 + 1]
)
#: steps 1..8 in 2 epochs of 4, 4 streams of bptt 8, a checkpoint every 2 steps
OVERRIDES = [
    "task.name=text_file",
    "model.hidden_size=8",
    "train.batch_size=4",
    "train.bptt=8",
    "train.eval_batch_size=3",
    "train.epochs=2",
    "train.steps_per_epoch=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.early_stopping=0",
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun(nproc: int, args: list[str], *launcher: str, fault: str = ""):
    """``torchrun ... nestrnn train ARGS`` (through tests/faults.py when ``fault`` is given)."""
    program = [FAULTS, fault, "--"] if fault else ["-m", "nestrnn"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *launcher,
        *program,
        "train",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)


def _losses(run_dir: Path) -> dict[tuple[str, int], float]:
    """Every train record's loss and every epoch's validation loss, by (event, step)."""
    out = {}
    for record in rd.RunDir(run_dir).records():
        if record["event"] == "train":
            out["train", record["step"]] = record["loss"]
        elif record["event"] == "epoch":
            out["valid", record["step"]] = record["valid"]["loss"]
        elif record["event"] == "test":
            out["test", record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    """The reference: one process, the global batch of 4 streams."""
    import torch

    threads = torch.get_num_threads()
    run_dir = tmp_path_factory.mktemp("single") / "run"
    try:
        code = main(
            ["train", "--no-progress", "--run-dir", str(run_dir), f"task.path={corpus}", *OVERRIDES]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def double(corpus, tmp_path_factory) -> Path:
    """Two processes with 2 streams each (through ``nestrnn train --nproc 2``: torchrun)."""
    run_dir = tmp_path_factory.mktemp("double") / "run"
    command = [
        sys.executable,
        "-m",
        "nestrnn",
        "train",
        "--nproc",
        "2",
        "--no-progress",
        "--run-dir",
        str(run_dir),
        f"task.path={corpus}",
        *OVERRIDES,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-6), key
        worst = max(worst, abs(a[key] - b[key]))
    return worst


def test_two_processes_train_like_one(single, double):
    one, two = _losses(single), _losses(double)
    assert len([k for k in one if k[0] == "train"]) == 8
    worst = _assert_close(one, two)
    print(f"largest |loss difference| between 1 and 2 processes: {worst:.3g}")
    # only rank 0 wrote the run directory, and the checkpoint holds the global carried state
    ckpt = rd.load_checkpoint(double / rd.LAST)
    assert ckpt["carry"][0].shape[-2] == 4 and len(ckpt["rng_ranks"]) == 2
    summary = json.loads((double / rd.SUMMARY).read_text())
    assert summary["steps"] == 8


def test_resume_with_another_number_of_processes(single, double, corpus, tmp_path):
    """A 2-process run stopped at step 3 (mid-epoch, carried state) continues in 1 process."""
    run_dir = tmp_path / "run"
    args = ["--no-progress", "--run-dir", str(run_dir), f"task.path={corpus}", *OVERRIDES]
    result = _torchrun(2, [*args, "train.max_steps=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"] == 3
    assert main(["train", "--no-progress", "--resume", str(run_dir), "train.max_steps=0"]) == 0
    resumed = _losses(run_dir)
    del resumed["test", 3]  # the max_steps stop evaluated the model on the test split
    _assert_close(_losses(single), resumed)


def test_killed_worker_restarts_from_checkpoint(double, corpus, tmp_path):
    """Rank 1 dies after step 5; torchrun restarts both workers, which resume from last.pt
    (step 4) and finish with the losses of the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = ["--no-progress", "--run-dir", str(run_dir), f"task.path={corpus}", *OVERRIDES]
    result = _torchrun(2, args, "--max-restarts=1", fault="crash:1:5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fault: rank 1 exits after step 5" in result.stderr
    assert "resuming at epoch 2, step 4" in result.stdout
    steps = [r["step"] for r in rd.RunDir(run_dir).records() if r["event"] == "train"]
    assert steps == list(range(1, 9))  # the records of the lost step 5 were dropped, then redone
    _assert_close(_losses(double), _losses(run_dir))
    assert rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"] == 8


def test_elastic_restarts_need_a_run_dir(corpus):
    result = _torchrun(1, [f"task.path={corpus}", *OVERRIDES], "--max-restarts=1")
    assert result.returncode != 0
    assert "nestrnn train: error: with torchrun --max-restarts give --run-dir DIR" in result.stderr


def test_kill_during_checkpoint_write_keeps_the_previous_one(corpus, tmp_path):
    """A kill -9 inside the atomic write of last.pt: the previous last.pt stays whole, and the
    resume that follows removes the temporary file the killed process left."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        FAULTS,
        "pause-in-checkpoint:60",
        "--",
        "train",
        "--no-progress",
        "--run-dir",
        str(run_dir),
        f"task.path={corpus}",
        *OVERRIDES,
    ]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env()
    )
    try:
        for line in proc.stdout:
            if line.startswith(PAUSED):
                break
        else:
            pytest.fail("the checkpoint pause was never reached")
        before = (run_dir / rd.LAST).read_bytes()
        temporary = list(run_dir.glob(".last.pt.*.tmp"))
        assert temporary and temporary[0].stat().st_size > 0  # inside the atomic write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / rd.LAST).read_bytes() == before
    assert list(run_dir.glob(".last.pt.*.tmp")) == temporary  # left behind by the kill
    ckpt = rd.load_checkpoint(run_dir / rd.LAST)
    assert ckpt["position"]["global_step"] == 2  # the write of step 4 never happened
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["train", "--no-progress", "--resume", str(run_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"] == 8
    assert not list(run_dir.glob(".*.tmp"))


def kill_at_step(process: subprocess.Popen[str], run_dir: Path, step: int) -> None:
    """``kill -9`` of ``process`` once the run has reached ``step``; then wait until no process
    of the run is left."""
    try:
        wait_for_step(run_dir, step, process)
        process.kill()
        process.communicate(timeout=30)
        wait_until_gone(str(run_dir))
    finally:
        process.kill()


def test_the_launcher_takes_torchrun_and_its_workers_along(corpus, tmp_path):
    """``kill -9`` of the --nproc launcher: torchrun and both workers stop too (they save last.pt
    at the step they reached); SIGTERM to a resumed launch: the same, and exit status 143."""
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--nproc",
        "2",
        "--no-progress",
        f"task.path={corpus}",
        *OVERRIDES,
        "train.steps_per_epoch=10000000",
        "train.checkpoint_every=0",
    ]
    kill_at_step(start_cli([*args, "--run-dir", str(run_dir)]), run_dir, 3)
    step = rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"]
    assert rd.RunDir(run_dir).records()[-1]["event"] == "stopped"

    resumed = start_cli([*args, "--resume", str(run_dir)])
    try:
        wait_for_step(run_dir, step + 3, resumed)
        resumed.send_signal(signal.SIGTERM)
        _, err = resumed.communicate(timeout=90)
        wait_until_gone(str(run_dir))
    finally:
        resumed.kill()
    assert resumed.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"nestrnn train --resume {run_dir}" in err and "Traceback" not in err
    last = rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"]
    steps = [r["step"] for r in rd.RunDir(run_dir).records() if r["event"] == "train"]
    assert steps == list(range(1, last + 1))


def test_a_killed_torchrun_takes_its_workers_along(corpus, tmp_path):
    """``kill -9`` of torchrun itself (started by hand, not by --nproc): both workers get SIGTERM,
    save last.pt at the step they reached and stop."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "nestrnn",
        "train",
        "--no-progress",
        "--run-dir",
        str(run_dir),
        f"task.path={corpus}",
        *OVERRIDES,
        "train.steps_per_epoch=10000000",
        "train.checkpoint_every=0",
    ]
    agent = subprocess.Popen(
        command, env=_env(), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    kill_at_step(agent, run_dir, 3)
    assert rd.RunDir(run_dir).records()[-1]["event"] == "stopped"
    assert rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"] >= 3


CLOSE_SCRIPT = """
import os, sys, torch
from nestrnn.engine.distributed import DistContext

def gloo_threads():
    tasks = os.listdir("/proc/self/task")
    return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "pt_gloo_runloop" for t in tasks)

with DistContext.from_env("gloo") as dist:
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    net(torch.ones(4, 3)).sum().backward()
    del net
    running = gloo_threads()
print(f"rank {dist.rank} gloo threads: {running} open, {gloo_threads()} closed")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_closing_stops_the_process_groups_threads(tmp_path):
    """After DDP has been used, closing the context stops gloo's worker threads (had a module
    kept the group as a default argument, they would run on into the interpreter's shutdown,
    where a worker that still held a tensor aborted the process)."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT, encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = re.findall(r"rank (\d) gloo threads: (\d+) open, (\d+) closed", result.stdout)
    assert sorted(rank for rank, _, _ in counts) == ["0", "1"], result.stdout
    assert all(int(open_) > 0 and closed == "0" for _, open_, closed in counts), counts


def test_the_launcher_passes_sighup_on_and_every_worker_saves(corpus, tmp_path):
    """SIGHUP to the --nproc launcher (its terminal closed): torchrun passes it on as SIGHUP, the
    workers stop at the same step as on SIGTERM, last.pt is saved there, exit status 129."""
    run_dir = tmp_path / "run"
    launcher = start_cli(
        [
            "train",
            "--nproc",
            "2",
            "--no-progress",
            f"task.path={corpus}",
            *OVERRIDES,
            "train.steps_per_epoch=10000000",
            "train.checkpoint_every=0",
            "--run-dir",
            str(run_dir),
        ]
    )
    try:
        wait_for_step(run_dir, 3, launcher)
        launcher.send_signal(signal.SIGHUP)
        _, err = launcher.communicate(timeout=90)
        wait_until_gone(str(run_dir))
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGHUP, err[-3000:]
    assert f"nestrnn train --resume {run_dir}" in err and "Traceback" not in err
    step = rd.load_checkpoint(run_dir / rd.LAST)["position"]["global_step"]
    assert step >= 3
    assert rd.RunDir(run_dir).records()[-1] == {
        "event": "stopped",
        "step": step,
        "epoch": 1,
        "signal": "SIGHUP",
    }


def test_a_launcher_under_nohup_ignores_sighup(corpus, tmp_path):
    """``nohup nestrnn train --nproc 2``: a SIGHUP reaches neither torchrun nor the workers."""
    run_dir = tmp_path / "run"
    command = [
        "nohup",
        sys.executable,
        "-m",
        "nestrnn",
        "train",
        "--nproc",
        "2",
        "--no-progress",
        f"task.path={corpus}",
        *OVERRIDES,
        "train.steps_per_epoch=10000000",
        "train.checkpoint_every=0",
        "--run-dir",
        str(run_dir),
    ]
    launcher = subprocess.Popen(
        command, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for_step(run_dir, 3, launcher)
        launcher.send_signal(signal.SIGHUP)
        steps = [r["step"] for r in rd.RunDir(run_dir).records() if r["event"] == "train"]
        wait_for_step(run_dir, max(steps) + 3, launcher)  # still training
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=90)
        wait_until_gone(str(run_dir))
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert rd.RunDir(run_dir).records()[-1]["signal"] == "SIGTERM"


def test_sigterm_during_the_final_test_stops_every_worker(corpus, tmp_path):
    """SIGTERM to torchrun while its workers run the final test: all of them abandon it at the
    same batch (no worker waits for another in a collective), the run is complete without a test
    record."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        FAULTS,
        "slow-eval:test:1",
        "--",
        "train",
        "--no-progress",
        "--run-dir",
        str(run_dir),
        f"task.path={corpus}",
        *OVERRIDES,
    ]
    agent = subprocess.Popen(
        command, env=_env(), text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        seen = []
        for line in agent.stderr:
            seen.append(line)
            if line.startswith(EVALUATING):
                agent.send_signal(signal.SIGTERM)
                break
        _, err = agent.communicate(timeout=90)
        wait_until_gone(str(run_dir))
    finally:
        agent.kill()
    err = "".join(seen) + err
    assert "stopped by SIGTERM during the final test" in err, err[-3000:]
    records = rd.RunDir(run_dir).records()
    assert "test" not in [r["event"] for r in records]
    assert records[-1] == {
        "event": "stopped",
        "step": 8,
        "epoch": 2,
        "signal": "SIGTERM",
        "during": "test",
    }
    assert json.loads((run_dir / rd.SUMMARY).read_text())["test"] == {}


def _pid_namespaces_work() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _pid_namespaces_work(), reason="needs unshare --pid (root or user ns)")
def test_torchrun_as_pid_1_trains(corpus, tmp_path):
    """torchrun as a container's entrypoint is pid 1 (here: of a new pid namespace): its workers'
    parent is pid 1 and alive, which is no orphan; the run trains to its end."""
    run_dir = tmp_path / "run"
    command = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "nestrnn",
        "train",
        "--no-progress",
        "--run-dir",
        str(run_dir),
        f"task.path={corpus}",
        *OVERRIDES,
        "train.epochs=1",
        "train.steps_per_epoch=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / rd.SUMMARY).read_text())["steps"] == 2


def test_a_signal_inside_torch_s_bookkeeping_is_the_same_quiet_stop(monkeypatch):
    """A SIGTERM that lands in torchrun's metrics wrapper comes out as an UnboundLocalError raised
    while handling the SignalException; the launcher still exits 143 without a traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from nestrnn.engine import torchrun

    def stopped_in_bookkeeping(argv):
        try:
            raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
        except SignalException:
            raise UnboundLocalError("cannot access local variable 'start'") from None

    monkeypatch.setattr(torchrun, "torchrun_main", stopped_in_bookkeeping)
    assert torchrun.main([]) == 128 + signal.SIGTERM

    def broken(argv):
        raise ValueError("not a signal")

    monkeypatch.setattr(torchrun, "torchrun_main", broken)
    with pytest.raises(ValueError, match="not a signal"):
        torchrun.main([])
