"""The training loop: truncated BPTT, clipping, schedule, evaluation, checkpoints, exact resume.

One optimizer step per batch. For language-model tasks the recurrent state (the full nested state:
``h`` and every memory level's cell) is carried from one batch to the next, detached, and reset at
the start of each pass over the corpus. After every epoch the model is evaluated on the validation
split; the best one is kept in ``best.pt``; ``last.pt`` holds everything needed to continue exactly:
model, optimizer, schedule, every RNG state, the data position (the global step: batch ``k`` is a
pure function of ``k``), the carried state and the partial metric sums.

A non-finite loss or gradient norm stops the run with :class:`TrainingDiverged` before the optimizer
step, so the checkpoints on disk stay the last good ones. A SIGTERM, SIGINT or SIGHUP (see
:mod:`nestrnn.engine.stopping`) stops it at the end of the current step, with ``last.pt`` saved
there; during the validation after an epoch, at the next batch, with ``last.pt`` saved at the end
of the epoch's training (a resume validates again); during the final test, at the next batch,
with the run complete but no test result (``nestrnn eval RUN_DIR --split test`` gives it).

Building a :class:`Trainer` checks everything (the configuration against the data and the
checkpoint, the memory the run needs) and writes nothing; :meth:`Trainer.fit` takes the run
directory (its lock: one writer at a time) and writes.

Under ``torchrun`` (a :class:`~nestrnn.engine.distributed.DistContext` with ``world_size > 1``)
the model is wrapped in ``DistributedDataParallel``, each rank trains on its rows of the global
batch, metric sums are all-reduced, and rank 0 alone writes; checkpoints hold the global state
(every stream's carried state, every rank's RNG), so a run resumes with any number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from nestrnn.config import (
    ConfigError,
    check_device,
    check_same_model,
    format_config,
    section,
    to_container,
    trained_config,
)
from nestrnn.engine import rundir as rd
from nestrnn.engine.build import build_task, load_weights, model_settings
from nestrnn.engine.distributed import DistContext
from nestrnn.engine.lock import DirectoryLock
from nestrnn.engine.resources import Workload, check_fits, minimum_parameters, recurrent_levels
from nestrnn.engine.rundir import Replace
from nestrnn.engine.schedule import LRSchedule, build_optimizer
from nestrnn.engine.stopping import StopSignals
from nestrnn.engine.tracking import (
    TIMESCALE_ROWS,
    TIMESCALE_STATISTIC,
    TIMESCALE_STEPS,
    Loggers,
    build_loggers,
)
from nestrnn.models import Sizing, describe_family, size_model

#: with train.threads=0 ("auto"), CPU runs of models smaller than this use one thread
SMALL_MODEL = 1_000_000


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; the message says what to do."""


class EvaluationStopped(Exception):
    """An evaluation was abandoned because a stop signal arrived (see :func:`evaluate`)."""


@dataclass
class Summary:
    run_dir: Path
    #: completed | early_stopping | max_steps | stopped (fit's stop_at) | interrupted (a signal) |
    #: test_interrupted (a signal during the final test: training is complete, the test is not) |
    #: already_finished (a resumed run with nothing left to do: nothing was written)
    reason: str
    epochs: int
    steps: int
    elapsed: float
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    primary_metric: str = "loss"
    signal: int = 0  # the number of the signal that interrupted the run


def resolve_device(spec: str, what: str = "train.device") -> torch.device:
    """The device ``spec`` names (auto: CUDA when there is one); ``what`` names the setting in
    the ConfigError for a spec that names no device or a device that is not here."""
    check_device(spec, what)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}={spec} but CUDA is not available here; use auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{what}={spec} but this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}; use one of them, cuda or auto"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{what}={spec} but MPS (Apple GPUs) is not available here; use auto or cpu"
        )
    return device


def shard_rows(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous block of the rows of an evaluation batch (uneven is fine: the
    statistics are sums; a rank may get no rows when the batch is smaller than the world)."""
    if world_size == 1:
        return batch
    inputs = torch.tensor_split(batch.inputs, world_size)[rank]
    targets = torch.tensor_split(batch.targets, world_size)[rank]
    return type(batch)(inputs, targets, batch.carry)


def _state_rows(state: Any, rank: int, world_size: int) -> Any:
    """This rank's rows of a carried recurrent state (batch is dim -2 of every tensor)."""
    if state is None or world_size == 1:
        return state
    return tuple(torch.tensor_split(t, world_size, dim=-2)[rank].contiguous() for t in state)


def _detach(state: Any) -> Any:
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


def _check_resumable(saved: str, config: DictConfig) -> None:
    """Raise ConfigError when ``config`` changes what the checkpoint (its ``saved``
    configuration) was built with."""
    check_same_model(
        trained_config(saved),
        config,
        lambda changes: f"the model cannot change when resuming ({changes}); start a new run",
        lambda old, new: f"cannot resume a {old} run as task {new}; start a new run",
    )


def _check_resume_overrides(saved: str, config: DictConfig, carries_state: bool) -> None:
    """Raise ConfigError for a change that cannot continue the state in the checkpoint (its
    ``saved`` configuration), before anything is written:
    the optimizer's kind (its state is that optimizer's) and, for a run that carries its state
    from batch to batch, the batch size (the carried state has one row per stream)."""
    trained = trained_config(saved)
    old, new = trained.optim.name, config.optim.name
    if old != new:
        raise ConfigError(
            f"optim.name cannot change when resuming (the checkpoint holds the state of {old}, "
            f"not {new}); start a new run"
        )
    old, new = trained.train.batch_size, config.train.batch_size
    if carries_state and old != new:
        raise ConfigError(
            f"train.batch_size cannot change when resuming this run ({old} -> {new}): it carries "
            f"the state of {old} streams from batch to batch; start a new run"
        )


def format_metrics(metrics: dict[str, float], keys: list[str] | None = None) -> str:
    """``"loss 1.2345 bpc 1.7810 error 12.50"``: metrics as printed on the console."""
    keys = keys or list(metrics)
    parts = []
    for key in keys:
        value = metrics[key]
        parts.append(f"{key} {value:.2f}" if key in ("error", "acc") else f"{key} {value:.4f}")
    return " ".join(parts)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    task: Any,
    split: str,
    batch_size: int,
    bptt: int,
    device: torch.device,
    max_batches: int = 0,
    dist: DistContext | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` of ``task`` (``max_batches`` 0: the whole split).

    ``stop()`` is asked before every batch (by every rank: it may be a collective); when it says
    True the evaluation is abandoned with :class:`EvaluationStopped`, so that a signal does not
    wait for a whole split (a scheduler kills a job a fixed time after its SIGTERM)."""
    was_training = model.training
    model.eval()
    totals: dict[str, Tensor] = {}
    state = None
    for i, batch in enumerate(task.eval_batches(split, batch_size, bptt)):
        if max_batches and i >= max_batches:
            break
        if stop is not None and stop():
            model.train(was_training)
            raise EvaluationStopped(split)
        if dist is not None and dist.world_size > 1:
            batch = shard_rows(batch, dist.rank, dist.world_size)
            if batch.rows == 0:
                continue
        batch = batch.to(device)
        if not (batch.carry and task.carries_state):
            state = None
        output, state = model(batch.inputs, state)
        _, stats = task.loss(output, batch)
        for key, value in stats.items():
            value = value.to(device, torch.float64)
            totals[key] = totals[key] + value if key in totals else value
    model.train(was_training)
    if dist is not None:
        totals = dist.all_reduce_stats(totals)
    return task.metrics({k: float(v) for k, v in totals.items()})


class Trainer:
    """Trains one run (see the module docstring).

    Args:
        config: a resolved configuration (:func:`nestrnn.config.load_config`).
        run_dir: where the run's files go (created by :meth:`fit` when missing).
        resume: continue from ``run_dir/last.pt``.
        replace: for a new run, what it may replace in ``run_dir``: ``"nothing"`` (the default:
            a directory holding a run is an error), ``"incomplete"`` (the files of a run that
            saved no checkpoint) or ``"any"`` (any previous run: ``--overwrite``).
        allow_data_change: resume even when the task's data differs from the checkpoint's.
        dist: the process topology (single process by default).
        echo: where progress lines go (``print``-like; None: silent).
    """

    def __init__(
        self,
        config: DictConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        replace: Replace = "nothing",
        allow_data_change: bool = False,
        dist: DistContext | None = None,
        echo: Callable[[str], None] | None = print,
    ) -> None:
        self.config = config
        self.model_cfg = section(config, "model")
        self.optim_cfg = section(config, "optim")
        self.train_cfg = section(config, "train")
        self.dist = dist or DistContext.single()
        self._echo = echo
        self._open_run_dir(run_dir, resume, replace)
        self._choose_device()
        checkpoint = self.dist.from_main(self._read_last) if resume else None
        if checkpoint is not None:
            _check_resumable(checkpoint["config"], config)
        self._build_data(checkpoint, allow_data_change)
        self._build_model(checkpoint)
        self._build_optimizer()
        self.loggers: Loggers = build_loggers(config, self.run, self.dist.is_main)
        self._reset_progress()
        if checkpoint is not None:
            self._restore(checkpoint)
            del checkpoint
        self._wrap_for_processes()

    # ------------------------------------------------------------------ building (no writes)

    def _open_run_dir(self, run_dir: str | Path, resume: bool, replace: Replace) -> None:
        """The run directory and what this trainer may do to it (nothing is written yet)."""
        self.run = rd.RunDir(run_dir, self.dist.is_main)
        self.replace = replace
        #: whether run_dir holds this run already (resumed, or written by an earlier fit)
        self._continues = resume
        self._lock: DirectoryLock | None = None
        self._stop: StopSignals | None = None
        self._stop_agreed = False
        self._last_stamp: tuple[int, ...] | None = None  # the last.pt this trainer knows

    def _choose_device(self) -> None:
        """The device (each process its own GPU under torchrun), the threads, the seeds."""
        tc = self.train_cfg
        self.device = resolve_device(tc.device)
        if self.dist.world_size > 1:
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.dist.local_rank)
            if self.dist.backend == "nccl" and self.device.type != "cuda":
                raise ConfigError(
                    f"train.device={tc.device} runs on the CPU but the process group uses nccl; "
                    "add --backend gloo"
                )
            if tc.batch_size % self.dist.world_size:
                raise ConfigError(
                    f"train.batch_size ({tc.batch_size}) must be a multiple of the number of "
                    f"processes ({self.dist.world_size}): each one trains on an equal share"
                )
        if tc.threads:
            torch.set_num_threads(tc.threads)
        rd.seed_everything(tc.seed)

    def _build_data(self, checkpoint: dict[str, Any] | None, allow_data_change: bool) -> None:
        """The task and its data (a resumed run's: the checkpoint's task state), checked
        against the checkpoint."""
        self.task = build_task(self.config, None if checkpoint is None else checkpoint["task"])
        if checkpoint is not None:
            _check_resume_overrides(checkpoint["config"], self.config, self.task.carries_state)
        self.data_fingerprint = self.task.data_fingerprint()
        if checkpoint is not None and not allow_data_change:
            self._check_same_data(checkpoint.get("data_fingerprint"))

    def _build_model(self, checkpoint: dict[str, Any] | None) -> None:
        """The model, sized (or as the checkpoint sized it), checked to fit in memory first."""
        tc = self.train_cfg
        with model_settings():
            if checkpoint is not None:
                meta = checkpoint["model_meta"]
                self.sizing = Sizing(
                    meta["family"], meta["hidden_size"], meta["params"], meta["target"]
                )
            else:
                if not self.model_cfg.target_params:  # refuse a huge model before building it
                    self._check_memory(
                        minimum_parameters(self.model_cfg), self.model_cfg.hidden_size
                    )
                self.sizing = size_model(self.model_cfg, self.task.build_model)
            self._check_memory(self.sizing.params, self.sizing.hidden_size)
            if not tc.threads and self.device.type == "cpu" and self.sizing.params < SMALL_MODEL:
                torch.set_num_threads(1)  # tiny recurrent models run fastest on one thread
            model = self.task.build_model(self.model_cfg, self.sizing.hidden_size)
        self.model = model.to(self.device)
        if self.dist.rank:  # its own dropout masks (the model is rank 0's: DDP broadcasts it)
            rd.seed_everything(tc.seed + 7919 * self.dist.rank)

    def _build_optimizer(self) -> None:
        """The optimizer, the epochs' length and the learning-rate schedule over them."""
        tc = self.train_cfg
        self.optimizer = build_optimizer(self.model, self.optim_cfg)
        self.eval_batch_size = tc.eval_batch_size or tc.batch_size
        try:
            per_pass = self.task.num_train_batches(tc.batch_size, tc.bptt)
        except ValueError as error:  # e.g. a split too short for batch_size x bptt
            raise ConfigError(str(error)) from None
        self.steps_per_epoch = tc.steps_per_epoch or per_pass
        for split in ("valid", "test") if tc.test else ("valid",):
            try:  # a split too short for eval_batch_size streams fails now, not after an epoch
                next(iter(self.task.eval_batches(split, self.eval_batch_size, tc.bptt)), None)
            except ValueError as error:
                raise ConfigError(f"{error} (train.eval_batch_size)") from None
        # the schedule spans the planned epochs; train.max_steps only stops early
        self.schedule = LRSchedule(self.optimizer, self.optim_cfg, tc.epochs * self.steps_per_epoch)

    def _reset_progress(self) -> None:
        """The progress of a new run (all of it is in the checkpoint: :meth:`_restore`)."""
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}
        self.bad_epochs = 0
        self.carry: Any = None
        self.epoch_stats: dict[str, float] = {}
        self.log_stats: dict[str, float] = {}
        self.elapsed = 0.0
        self.last_checkpoint_step: int | None = None

    def _wrap_for_processes(self) -> None:
        """What training calls: the model, in DistributedDataParallel under torchrun."""
        self.net: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    # ------------------------------------------------------------------ checks before writing

    def _read_last(self) -> dict[str, Any]:
        """``last.pt`` (rank 0), noting which file it was: :meth:`fit` checks that no other
        process replaced it in between."""
        checkpoint = self.run.load_checkpoint(rd.LAST)
        self._last_stamp = _stamp(self.run / rd.LAST)
        return checkpoint

    def _check_same_data(self, saved: str | None) -> None:
        if saved is not None and self.data_fingerprint not in (None, saved):
            raise ConfigError(
                f"the data of task {self.config.task.name} differs from the data {self.run.path} "
                f"was trained on (fingerprint {self.data_fingerprint[:12]}, checkpoint "
                f"{saved[:12]}); restore the original data, start a new run, or pass "
                "--allow-data-change to continue on this data"
            )

    def _check_memory(self, params: int, hidden_size: int) -> None:
        work = dataclasses.replace(self._workload, params=params, hidden_size=hidden_size)
        check_fits(work, self.device)

    @functools.cached_property
    def _workload(self) -> Workload:
        """What a training step of this run holds in memory, less the model's part (parameters
        and hidden size, which each check fills in): worked out once, as it reads a batch."""
        tc = self.train_cfg
        steps = tc.bptt if self.task.carries_state else self._sequence_length()
        return Workload(
            0,
            self.optim_cfg.name,
            tc.batch_size // self.dist.world_size,
            steps,
            0,
            recurrent_levels(self.model_cfg),
        )

    def _sequence_length(self) -> int:
        inputs = self.task.train_batch(0, 1, self.train_cfg.bptt).inputs
        return int(inputs.shape[1]) if inputs.dim() > 1 else 1

    # ------------------------------------------------------------------ the run directory

    def _take_run_dir(self) -> None:
        """Lock the run directory (rank 0), check that it is still what this trainer was built
        for, and write the start of the run; the lock is held until :meth:`fit` ends."""
        lock = self.run.lock()
        try:
            if self._continues:
                if _stamp(self.run / rd.LAST) != self._last_stamp:
                    raise rd.RunDirError(
                        f"{self.run / rd.LAST} was replaced by another process since this one "
                        "read it; run the command again"
                    )
                self.run.remove_leftovers()
                self.run.truncate_records(self.global_step)
            else:
                self.run.check_new_run(self.replace)
                self.run.clear()
                self.run.write_json(rd.ENVIRONMENT, rd.environment(self.device))
            self.run.write_text(rd.CONFIG, format_config(self.config))  # with a resume's overrides
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self._continues = True

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _finished_summary(self) -> dict[str, Any] | None:
        """The summary of a resumed run that has nothing left to do (None: there is work)."""
        tc = self.train_cfg
        done = (
            self.epoch >= tc.epochs
            or (tc.max_steps and self.global_step >= tc.max_steps)
            or (tc.early_stopping and self.bad_epochs >= tc.early_stopping)
        )
        if not (self._continues and done):
            return None
        summary = rd.read_summary(self.run / rd.SUMMARY)  # None: killed before writing it
        return summary if summary is not None and summary.get("steps") == self.global_step else None

    # ------------------------------------------------------------------ output

    def log(self, message: str) -> None:
        if self._echo is not None and self.dist.is_main:
            self._echo(message)

    @property
    def higher_is_better(self) -> bool:
        return bool(self.task.higher_is_better)

    def describe(self) -> str:
        name = self.config.task.name
        lines = [f"task {name}: {self.task.describe()}".rstrip(": ")]
        lines.append(f"model {describe_family(self.model_cfg)}, {self.sizing.describe()}")
        tc, oc = self.train_cfg, self.optim_cfg
        lines.append(
            f"{oc.name} lr {oc.lr:g} ({oc.schedule}), clip {oc.grad_clip:g}; {tc.epochs} epochs x "
            f"{self.steps_per_epoch} steps, batch {tc.batch_size}"
            + (f", bptt {tc.bptt}" if self.task.carries_state else "")
            + f"; device {self.device}"
        )
        lines.append(f"run directory {self.run.path}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints

    def _check_finite(self) -> None:
        # the parameters are the same on every rank, so every rank raises (or none does)
        for p in self.model.parameters():
            if not torch.isfinite(p).all():
                raise TrainingDiverged(
                    "the parameters became non-finite; not overwriting the last good checkpoint"
                )

    def _payload(self, full: bool) -> dict[str, Any]:
        self._check_finite()
        payload: dict[str, Any] = {
            "format": rd.FORMAT,
            "model": self.model.state_dict(),
            "model_meta": {
                "family": self.sizing.family,
                "hidden_size": self.sizing.hidden_size,
                "params": self.sizing.params,
                "target": self.sizing.target,
            },
            "task": self.task.state_dict(),
            "data_fingerprint": self.data_fingerprint,
            "config": OmegaConf.to_yaml(to_container(self.config)),
            "position": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step,
            },
            "metrics": {
                "best": self.best,
                "best_epoch": self.best_epoch,
                "best_metrics": dict(self.best_metrics),
            },
        }
        if full:
            payload.update(
                optimizer=self.optimizer.state_dict(),
                schedule=self.schedule.state_dict(),
                rng=rd.capture_rng(),
                carry=None if self.carry is None else [t.cpu() for t in self.carry],
                progress={
                    "bad_epochs": self.bad_epochs,
                    "epoch_stats": dict(self.epoch_stats),
                    "log_stats": dict(self.log_stats),
                    "elapsed": self.elapsed,
                },
            )
        return payload

    def save(self, name: str = rd.LAST) -> None:
        """Write checkpoint ``name`` (rank 0; every rank must call it: it gathers the ranks'
        RNG states and carried states, so the checkpoint holds the global state)."""
        full = name == rd.LAST
        world = self.dist.world_size
        if world > 1 and full:
            self._check_finite()
            carry = None if self.carry is None else [t.cpu() for t in self.carry]
            gathered = self.dist.gather({"rng": rd.capture_rng(), "carry": carry})
        if self.dist.is_main:
            payload = self._payload(full=full)
            if world > 1 and full:
                payload["rng_ranks"] = [g["rng"] for g in gathered]
                carries = [g["carry"] for g in gathered]
                payload["carry"] = (
                    None
                    if any(c is None for c in carries)
                    else [torch.cat(parts, dim=-2) for parts in zip(*carries)]
                )
            self.run.save_checkpoint(name, payload)
            if full:
                self._last_stamp = _stamp(self.run / rd.LAST)
        if full:
            self.last_checkpoint_step = self.global_step

    def _restore(self, ckpt: dict[str, Any]) -> None:
        load_weights(self.model, ckpt["model"], self.run / rd.LAST)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups' settings, less overrides
            group["weight_decay"] = self.optim_cfg.weight_decay
            if "momentum" in group:
                group["momentum"] = self.optim_cfg.momentum
        self.schedule.load_state_dict(ckpt["schedule"])
        position, metrics, progress = ckpt["position"], ckpt["metrics"], ckpt["progress"]
        self.epoch = position["epoch"]
        self.step_in_epoch = position["step_in_epoch"]
        self.global_step = position["global_step"]
        self.best, self.best_epoch = metrics["best"], metrics["best_epoch"]
        self.best_metrics = dict(metrics["best_metrics"])
        self.bad_epochs = progress["bad_epochs"]
        self.epoch_stats = dict(progress["epoch_stats"])
        self.log_stats = dict(progress["log_stats"])
        self.elapsed = progress["elapsed"]
        carry = ckpt.get("carry")
        world = self.dist.world_size
        if carry is not None:
            carry = _state_rows(tuple(carry), self.dist.rank, world)
        self.carry = None if carry is None else tuple(t.to(self.device) for t in carry)
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == world:
            rd.restore_rng(ranks[self.dist.rank])
        else:  # another number of processes: rank 0's state, each rank its own dropout stream
            rd.restore_rng(ckpt["rng"])
            if self.dist.rank:
                torch.manual_seed(self.train_cfg.seed + 7919 * self.dist.rank + self.global_step)
        self.last_checkpoint_step = self.global_step

    # ------------------------------------------------------------------ training

    def _diverged(self, what: str, value: float) -> TrainingDiverged:
        step = self.global_step + 1
        if self.last_checkpoint_step is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (
                f"the last good checkpoint is {self.run / rd.LAST} (step "
                f"{self.last_checkpoint_step})"
            )
        self.loggers.log_record(
            {
                "event": "diverged",
                "epoch": self.epoch + 1,
                "step": step,
                "what": what,
                "value": value,
            }
        )
        return TrainingDiverged(
            f"the {what} became {value} at step {step} (epoch {self.epoch + 1}); training stopped "
            f"and {kept}. Try a lower optim.lr or a smaller optim.grad_clip"
        )

    def _log_timescales(self) -> None:
        """Each memory level's timescale on a fixed validation batch, to the loggers that want
        them (with log.timescales): measured as ``nestrnn viz`` measures them."""
        if not self.loggers.wants_timescales:
            return
        from nestrnn import analysis

        inputs = self._timescale_batch
        if inputs is None:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            recording = analysis.record_cells(self.model, inputs.to(self.device))
            rows = analysis.timescales(recording)
        except Exception as error:  # a model record_cells cannot step: the training goes on
            self.loggers.timescales = False
            why = f"the timescales cannot be measured on this model ({error})"
            print(f"warning: {why}; they are not logged for the rest of the run", file=sys.stderr)
            return
        finally:
            self.model.train(was_training)
        timescales = {row.name: getattr(row, TIMESCALE_STATISTIC) for row in rows}
        self.loggers.log_timescales(self.global_step, timescales)

    @functools.cached_property
    def _timescale_batch(self) -> Tensor | None:
        """The first rows and steps of the first validation batch (None: under 3 steps)."""
        batch = next(
            iter(self.task.eval_batches("valid", self.eval_batch_size, self.train_cfg.bptt))
        )
        inputs = batch.inputs[:TIMESCALE_ROWS, :TIMESCALE_STEPS]
        return inputs if inputs.dim() > 1 and inputs.shape[1] >= 3 else None

    def _accumulate(self, target: dict[str, float], stats: dict[str, float]) -> None:
        for key, value in stats.items():
            target[key] = target.get(key, 0.0) + value

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on batch ``global_step``; returns (loss, gradient norm)."""
        tc = self.train_cfg
        batch = self.task.train_batch(self.global_step, tc.batch_size, tc.bptt)
        batch = self.task.shard_batch(batch, self.dist.rank, self.dist.world_size).to(self.device)
        state = self.carry if (batch.carry and self.task.carries_state) else None
        self.schedule.step(self.global_step)
        output, new_state = self.net(batch.inputs, state)
        loss, stats = self.task.loss(output, batch)
        keys = sorted(stats)
        stop = self._stop is not None and self._stop.received is not None
        parts = [loss.detach().double(), *(stats[k].to(loss.device).double() for k in keys)]
        if self.dist.world_size > 1:  # sums over the ranks; the loss: the mean of equal shards
            # a stop request rides along with the statistics: every rank stops after the same step
            parts.append(torch.tensor(float(stop), dtype=torch.float64, device=loss.device))
            summed = self.dist.all_reduce_tensor(torch.stack(parts))
            summed[0] /= self.dist.world_size
            values = summed.tolist()
            stop = values.pop() > 0
        else:
            values = torch.stack(parts).tolist()
        self._stop_agreed = stop
        if not math.isfinite(values[0]):
            raise self._diverged("loss", values[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):
            raise self._diverged("gradient norm", grad_norm)
        self.optimizer.step()
        self.carry = _detach(new_state) if self.task.carries_state else None
        self.global_step += 1
        self.step_in_epoch += 1
        step_stats = dict(zip(keys, values[1:]))
        self._accumulate(self.epoch_stats, step_stats)
        self._accumulate(self.log_stats, step_stats)
        if self.global_step % tc.log_every == 0:
            record = {
                "event": "train",
                "epoch": self.epoch + 1,
                "step": self.global_step,
                "lr": self.schedule.lr,
                "grad_norm": grad_norm,
            }
            metrics = self.task.metrics(self.log_stats)
            record.update(metrics)
            self.loggers.log_record(record)
            self.loggers.log_metrics(
                self.global_step,
                {**metrics, "lr": self.schedule.lr, "grad_norm": grad_norm},
                "train",
            )
            self.log_stats = {}
        return values[0], grad_norm

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        """Metrics of the current model on ``split`` (``max_batches`` None: train.eval_max_batches);
        inside :meth:`fit` with stop signals, a signal abandons it (:class:`EvaluationStopped`)."""
        if max_batches is None:
            max_batches = self.train_cfg.eval_max_batches
        return evaluate(
            self.model,
            self.task,
            split,
            self.eval_batch_size,
            self.train_cfg.bptt,
            self.device,
            max_batches,
            self.dist,
            None if self._stop is None else self._stop_requested,
        )

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached this process or, under torchrun, any rank (a collective:
        every rank asks at the same point, so that all of them stop there)."""
        wanted = self._stop is not None and self._stop.received is not None
        if self.dist.world_size > 1:
            flag = torch.tensor(float(wanted), dtype=torch.float64)
            wanted = float(self.dist.all_reduce_tensor(flag)) > 0
        return wanted

    def _signal_received(self) -> int:
        """The signal that stopped the run (a rank stopped by another's signal reports SIGTERM)."""
        return (self._stop and self._stop.received) or signal.SIGTERM

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            leave=False,
            desc=f"epoch {self.epoch + 1}/{self.train_cfg.epochs}",
            file=sys.stderr,
            # None: tqdm shows the bar only on a terminal
            disable=None if self.train_cfg.progress and self.dist.is_main else True,
            dynamic_ncols=True,
            mininterval=0.25,
        )

    def _train_epoch(self, stop_at: int | None) -> str | None:
        """Train until the epoch ends (None) or a step limit is hit (the reason)."""
        tc = self.train_cfg
        self.net.train()
        bar = self._progress_bar()
        started = time.perf_counter()
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                if tc.max_steps and self.global_step >= tc.max_steps:
                    return "max_steps"
                if stop_at is not None and self.global_step >= stop_at:
                    return "stopped"
                loss, _ = self.train_step()
                if self._stop_agreed:
                    return "interrupted"
                bar.update(1)
                if bar.n % 5 == 0 or self.step_in_epoch == self.steps_per_epoch:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.schedule.lr:.2g}", refresh=False)
                if tc.checkpoint_every and self.global_step % tc.checkpoint_every == 0:
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save(rd.LAST)
            return None
        finally:
            self.elapsed += time.perf_counter() - started
            bar.close()

    def _end_epoch(self, epoch_started: float) -> bool:
        """Evaluate, keep the best, checkpoint; True when early stopping says stop.

        A signal during the validation raises :class:`EvaluationStopped` with the epoch still
        open (all its steps done): saved so, a resume validates it again."""
        started = time.perf_counter()
        valid = self.evaluate("valid")
        self.elapsed += time.perf_counter() - started
        self.epoch += 1
        self.step_in_epoch = 0
        train_metrics = self.task.metrics(self.epoch_stats) if self.epoch_stats else {}
        self.epoch_stats = {}
        metric_name = self.task.primary_metric
        primary = valid[metric_name]
        better = math.isfinite(primary) and (
            self.best is None
            or (primary > self.best if self.higher_is_better else primary < self.best)
        )
        self.schedule.epoch_end(self.epoch, primary, self.higher_is_better)
        if better:
            self.best, self.best_epoch, self.best_metrics = primary, self.epoch, dict(valid)
            self.bad_epochs = 0
            self.save(rd.BEST)
        else:
            self.bad_epochs += 1
        self.loggers.log_record(
            {
                "event": "epoch",
                "epoch": self.epoch,
                "step": self.global_step,
                "lr": self.schedule.lr,
                "train": train_metrics,
                "valid": valid,
                "best": better,
            }
        )
        self.loggers.log_metrics(self.global_step, valid, "valid")
        self._log_timescales()
        self.save(rd.LAST)
        seconds = time.perf_counter() - epoch_started
        keys = [k for k in valid if k != "baseline"]
        self.log(
            f"epoch {self.epoch:>{len(str(self.train_cfg.epochs))}}/{self.train_cfg.epochs}"
            f" | train {format_metrics(train_metrics, [k for k in keys if k in train_metrics])}"
            f" | valid {format_metrics(valid, keys)} | lr {self.schedule.lr:.2g} | {seconds:.1f}s"
            + ("  *" if better else "")
        )
        patience = self.train_cfg.early_stopping
        return bool(patience and self.bad_epochs >= patience)

    def fit(self, stop_at: int | None = None, stop: StopSignals | None = None) -> Summary:
        """Train to the end, or to global step ``stop_at``, or until ``stop`` receives a signal
        (then ``last.pt`` holds the current step). The run directory stays locked meanwhile.

        A resumed run with nothing left to do (its summary written) changes nothing and returns
        a summary with reason ``already_finished``."""
        finished = self.dist.from_main(self._finished_summary)
        if finished is not None:
            return Summary(
                self.run.path,
                "already_finished",
                self.epoch,
                self.global_step,
                self.elapsed,
                self.best_epoch,
                self.best_metrics,
                finished.get("test") or {},
                self.task.primary_metric,
            )
        self.dist.from_main(self._take_run_dir)
        self._stop = stop
        try:
            self.loggers.start(self.config, self.run.path, self.global_step)
            try:
                return self._fit(stop_at)
            finally:
                self.loggers.close()
        finally:
            self._stop = None
            self._release_run_dir()

    def _fit(self, stop_at: int | None) -> Summary:
        tc = self.train_cfg
        reason = "completed"
        if self.global_step and self.epoch < tc.epochs:
            self.log(f"resuming at epoch {self.epoch + 1}, step {self.global_step}")
        while self.epoch < tc.epochs:
            epoch_started = time.perf_counter()
            stopped = self._train_epoch(stop_at)
            if stopped is not None:
                reason = stopped
                if self.last_checkpoint_step != self.global_step:
                    self.save(rd.LAST)
                break
            try:
                ended = self._end_epoch(epoch_started)
            except EvaluationStopped:
                reason = "interrupted"
                if self.last_checkpoint_step != self.global_step:
                    self.save(rd.LAST)
                break
            if ended:
                reason = "early_stopping"
                self.log(f"early stopping: no improvement in {tc.early_stopping} epochs")
                break
        if reason in ("stopped", "interrupted"):
            record: dict[str, Any] = {
                "event": "stopped",
                "step": self.global_step,
                "epoch": self.epoch + 1,
            }
            signum = 0
            if reason == "interrupted":
                signum = self._signal_received()
                record["signal"] = signal.Signals(signum).name
            self.loggers.log_record(record)
            return Summary(
                self.run.path,
                reason,
                self.epoch,
                self.global_step,
                self.elapsed,
                self.best_epoch,
                self.best_metrics,
                {},
                self.task.primary_metric,
                int(signum),
            )
        test: dict[str, float] = {}
        signum = 0
        if tc.test:
            try:
                test = self.test()
            except EvaluationStopped:  # the checkpoints are complete: only the test is missing
                signum = self._signal_received()
                self.loggers.log_record(
                    {
                        "event": "stopped",
                        "step": self.global_step,
                        "epoch": self.epoch,
                        "signal": signal.Signals(signum).name,
                        "during": "test",
                    }
                )
        if self.best_metrics:
            self.loggers.log_metrics(self.global_step, self.best_metrics, "best")
        summary = Summary(
            self.run.path,
            "test_interrupted" if signum else reason,
            self.epoch,
            self.global_step,
            self.elapsed,
            self.best_epoch,
            self.best_metrics,
            test,
            self.task.primary_metric,
            int(signum),
        )
        self.run.write_json(
            rd.SUMMARY,
            {
                "reason": reason,
                "epochs": self.epoch,
                "steps": self.global_step,
                "elapsed_s": round(self.elapsed, 2),
                "best_epoch": self.best_epoch,
                "valid": self.best_metrics,
                "test": test,
                "primary_metric": self.task.primary_metric,
                "params": self.sizing.params,
                "hidden_size": self.sizing.hidden_size,
            },
        )
        return summary

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the current model) on the test split."""
        best_path = self.run / rd.BEST
        best = self.dist.from_main(
            lambda: self.run.load_checkpoint(rd.BEST) if os.path.lexists(best_path) else None
        )
        if best is not None:
            load_weights(self.model, best["model"], best_path)
        source = "best checkpoint" if best is not None else "current model"
        metrics = self.evaluate("test", max_batches=0)
        self.loggers.log_record(
            {"event": "test", "step": self.global_step, "source": source, **metrics}
        )
        self.loggers.log_metrics(self.global_step, metrics, "test")
        return metrics


def _stamp(path: Path) -> tuple[int, ...] | None:
    """Which file is at ``path`` (inode, size, modification time); None when there is none."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)
