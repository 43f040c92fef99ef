"""A sweep worker: takes trials from the shared Optuna study until the spec's ``trials`` are
done, and trains each (trial, seed) as an ordinary run directory ``SWEEP/trials/NNNN-seedS/``
with ``nestrnn train`` in a subprocess (a crash, NaN or kill of one run never takes the worker
down; ``train.threads`` is set per worker).

Pruning follows the run's ``metrics.jsonl``: each validation record of the first seed is
reported to the trial, and when the pruner says so the run gets SIGTERM (it saves ``last.pt``)
and the trial is pruned. A worker that dies (``kill -9``) stops sending heartbeats; after three
missed ones another worker (or the next ``nestrnn sweep``) fails its trial and retries it with
the same parameters in the same run directories, resumed from ``last.pt``; a finished seed is
not trained again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, cast

import optuna

from nestrnn.config import format_config
from nestrnn.engine import rundir as rd
from nestrnn.engine.parent_death import libc_prctl, terminate_with_parent
from nestrnn.errors import UserError
from nestrnn.sweep.spec import Spec, make_pruner

# heartbeats and their retries are marked experimental; the sweep relies on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.ERROR)  # the table says why a trial failed

TRIALS = "trials"
CONFIGS = "configs"
LOGS = "logs"
#: how often a running trial's metrics.jsonl is read for new validation records
POLL_S = 0.25
#: trial states that count towards the spec's ``trials`` (a retried trial replaces its FAIL)
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class RunFailed(Exception):
    """A (trial, seed) run that did not finish: the trial is recorded as failed."""


def storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """The study's storage, with heartbeats so that a dead worker's trial is retried."""
    kwargs: dict[str, Any] = {}
    # a retry reports the resumed run's records again from its first epoch: nothing inherited
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        kwargs["heartbeat_stale_trial_callback"] = retry_callback()
    else:
        kwargs["failed_trial_callback"] = retry_callback()
    if url.startswith("sqlite"):  # several writers: wait for the lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s, **kwargs
        )
    except Exception as error:  # sqlalchemy's errors: a bad URL, an unreachable server
        raise UserError(f"cannot open the study storage {url}: {error}") from None


def make_study(spec: Spec, url: str, name: str) -> optuna.Study:
    """The shared study (created by the first worker, joined by the others)."""
    if spec.sampler == "grid":
        from nestrnn.sweep.spec import all_grid

        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(all_grid(spec))
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler()
    else:
        sampler = optuna.samplers.TPESampler()
    return optuna.create_study(
        storage=storage(url, spec.heartbeat_s),
        study_name=name,
        sampler=sampler,
        pruner=make_pruner(spec.pruner),
        direction=cast(Any, spec.direction),
        load_if_exists=True,
    )


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that used up one of the spec's ``trials``: finished, pruned, or failed with a
    reason (diverged, or a run that failed: a fault that fails every run ends the sweep). A
    trial whose worker died or was stopped is retried instead."""
    return trial.state in COUNTED or (
        trial.state == optuna.trial.TrialState.FAIL and "fail_reason" in trial.user_attrs
    )


def run_number(trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial) -> int:
    """The number that names a trial's run directories: a retried trial keeps its first one's
    (the retry copies the user attribute ``runs``)."""
    return int(trial.user_attrs.get("runs", trial.number))


class _Lock:
    """One worker on this machine at a time decides whether to start a trial, so that two do
    not both take the last one; released as soon as the trial exists."""

    def __init__(self, sweep_dir: Path) -> None:
        self.handle = open(sweep_dir / ".ask.lock", "a")  # noqa: SIM115 (held across calls)
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.held = False


def work(spec: Spec, study: optuna.Study, sweep_dir: Path, threads: int) -> None:
    """Run trials until ``spec.trials`` are done and no other worker's trial is running."""
    lock = _Lock(sweep_dir)

    interrupted: list[int] = []

    def run(trial: optuna.Trial) -> float:
        lock.release()  # the trial exists (RUNNING): others may now decide
        try:
            return objective(spec, trial, sweep_dir, threads)
        except KeyboardInterrupt:
            interrupted.append(trial.number)
            raise

    try:
        while True:
            lock.acquire()
            try:
                optuna.storages.fail_stale_trials(study)
                trials = study.get_trials(deepcopy=False)
                states = [t.state for t in trials]
                running = optuna.trial.TrialState.RUNNING in states
                if (
                    optuna.trial.TrialState.WAITING in states
                    or sum(map(counted, trials)) + states.count(optuna.trial.TrialState.RUNNING)
                    < spec.trials
                ):
                    try:
                        study.optimize(run, n_trials=1, catch=(RunFailed,))
                    except KeyboardInterrupt:  # Optuna failed the trial: queue it again, so
                        # that the next `nestrnn sweep` resumes its run directories
                        for trial in study.get_trials(deepcopy=False):
                            if trial.number in interrupted:
                                retry_callback()(study, trial)
                        raise
                    continue
            finally:
                lock.release()
            if not running:
                return
            time.sleep(1.0)  # others' trials: wait for them to finish, or to go stale and retry
    finally:
        lock.handle.close()


def retry_callback() -> Any:
    """Optuna's callback that queues a failed trial again with its parameters and attributes."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return retry() if retry is not None else optuna.storages.RetryFailedTrialCallback()


def sample(spec: Spec, trial: optuna.Trial) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in spec.params:
        if p.kind == "choice":
            values[p.key] = trial.suggest_categorical(p.key, p.choices)
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(
                p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return values


def objective(spec: Spec, trial: optuna.Trial, sweep_dir: Path, threads: int) -> float:
    """The mean over the seeds of each run's best validation metric."""
    values = sample(spec, trial)
    number = run_number(trial)
    trial.set_user_attr("runs", number)
    trial.set_user_attr("label", " ".join(f"{k}={v}" for k, v in values.items()))
    scores: list[float] = []
    for index, seed in enumerate(spec.seeds):
        name = f"{number:04d}-seed{seed}"
        config_file = sweep_dir / CONFIGS / f"{name}.yaml"
        config_file.parent.mkdir(exist_ok=True)
        config_file.write_text(format_config(spec.config(values, seed, threads)))
        score = run_seed(
            spec,
            trial,
            index == 0,
            sweep_dir / TRIALS / name,
            config_file,
            sweep_dir / LOGS / f"{name}.log",
        )
        trial.set_user_attr(f"seed{seed}", score)
        scores.append(score)
    return sum(scores) / len(scores)


def run_seed(
    spec: Spec, trial: optuna.Trial, report: bool, run_dir: Path, config_file: Path, log_file: Path
) -> float:
    """Train one (trial, seed) run (or resume it, or just read it when it is finished): its best
    validation metric. ``report``: report each validation record to the trial and prune the run
    when the pruner says so."""
    if not (run_dir / rd.SUMMARY).exists():
        command = [sys.executable, "-m", "nestrnn", "train"]
        if rd.RunDir(run_dir).resumable():
            command += ["--resume", str(run_dir)]
        else:
            command += ["-c", str(config_file), "--run-dir", str(run_dir), "--resume", "auto"]
        log_file.parent.mkdir(exist_ok=True)
        parent, prctl = os.getpid(), libc_prctl()
        with open(log_file, "a") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: terminate_with_parent(prctl, parent),
            )
            try:
                pruned = _follow(spec, trial if report else None, run_dir, process)
            except BaseException:  # Ctrl-C, an error here: the run saves last.pt and stops
                process.send_signal(signal.SIGTERM)
                process.wait()
                raise
        if pruned:
            trial.set_user_attr("pruned", f"at epoch {pruned} ({run_dir.name})")
            raise optuna.TrialPruned(f"pruned at epoch {pruned}")
        if process.returncode in (128 + signal.SIGHUP, 128 + signal.SIGINT, 128 + signal.SIGTERM):
            # stopped by a signal (Ctrl-C reaches the run and its worker): it saved last.pt;
            # the trial is queued again, and the next `nestrnn sweep` resumes it
            raise KeyboardInterrupt
        if process.returncode != 0:
            reason = _failure(run_dir, log_file, process.returncode)
            trial.set_user_attr("fail_reason", reason)
            if process.returncode == 1:  # TrainingDiverged: the configuration's own result
                trial.set_user_attr("diverged", True)
            raise RunFailed(f"{run_dir}: {reason}")
    scores = [record["valid"][spec.metric] for record in _epochs(spec, run_dir)]
    if not scores:
        trial.set_user_attr("fail_reason", f"{run_dir.name}: no validation record")
        raise RunFailed(f"{run_dir}: no validation record")
    return max(scores) if spec.direction == "maximize" else min(scores)


def _follow(
    spec: Spec, trial: optuna.Trial | None, run_dir: Path, process: subprocess.Popen[bytes]
) -> int:
    """Wait for the run; report its validation records to ``trial``. The epoch it was pruned
    at (after SIGTERM and its exit), else 0."""
    reported: set[int] = set()
    while True:
        done = process.poll() is not None
        if trial is not None:
            for record in _epochs(spec, run_dir):
                epoch = int(record["epoch"])
                if epoch in reported:
                    continue
                reported.add(epoch)
                trial.report(float(record["valid"][spec.metric]), epoch)
                if trial.should_prune():
                    if not done:
                        process.send_signal(signal.SIGTERM)  # it saves last.pt and exits
                    process.wait()
                    return epoch
        if done:
            return 0
        time.sleep(POLL_S)


def _epochs(spec: Spec, run_dir: Path) -> list[dict[str, Any]]:
    """The run's validation records so far (a torn last line is not one yet)."""
    try:
        text = (run_dir / rd.METRICS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "epoch":
            if spec.metric not in record.get("valid", {}):
                known = ", ".join(record.get("valid", {}))
                raise UserError(
                    f"metric {spec.metric!r} is not in the validation records of "
                    f"{run_dir} (they have {known})"
                )
            records.append(record)
    return records


def _failure(run_dir: Path, log_file: Path, status: int) -> str:
    """Why a run failed, in one line: its diverged record, else its last error line."""
    for record in reversed(_records(run_dir)):
        if record.get("event") == "diverged":
            return (
                f"diverged: {record.get('what', 'loss')} {record.get('value', 'nan')} at "
                f"step {record.get('step')}"
            )
    try:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    last = lines[-1].strip() if lines else ""
    if status < 0:
        return f"nestrnn train was killed by {signal.Signals(-status).name}"
    return f"nestrnn train exited with status {status}: {last}"


def _records(run_dir: Path) -> list[dict[str, Any]]:
    try:
        text = (run_dir / rd.METRICS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out
