"""The training loop: truncated BPTT, clipping, schedule, evaluation, checkpoints, exact resume.

One optimizer step per batch. For language-model tasks the recurrent state (the full nested state:
``h`` and every memory level's cell) is carried from one batch to the next, detached, and reset at
the start of each pass over the corpus. After every epoch the model is evaluated on the validation
split; the best one is kept in ``best.pt``; ``last.pt`` holds everything needed to continue exactly:
model, optimizer, schedule, every RNG state, the data position (the global step: batch ``k`` is a
pure function of ``k``), the carried state and the partial metric sums.

A non-finite loss or gradient norm stops the run with :class:`TrainingDiverged` before the optimizer
step, so the checkpoints on disk stay the last good ones.

Under ``torchrun`` (a :class:`~nestrnn.engine.distributed.DistContext` with ``world_size > 1``)
the model is wrapped in ``DistributedDataParallel``, each rank trains on its rows of the global
batch, metric sums are all-reduced, and rank 0 alone writes; checkpoints hold the global state
(every stream's carried state, every rank's RNG), so a run resumes with any number of processes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from nestrnn.config import ConfigError, format_config, section, task_class, to_container
from nestrnn.engine import rundir as rd
from nestrnn.engine.distributed import DistContext, restart_count
from nestrnn.engine.schedule import LRSchedule, build_optimizer
from nestrnn.models import Sizing, describe_family, size_model

#: with train.threads=0 ("auto"), CPU runs of models smaller than this use one thread
SMALL_MODEL = 1_000_000


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; the message says what to do."""


@dataclass
class Summary:
    run_dir: Path
    reason: str  # completed | early_stopping | max_steps | stopped
    epochs: int
    steps: int
    elapsed: float
    best_epoch: int = 0
    best: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    primary_metric: str = "loss"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec} but CUDA is not available here; use auto or cpu")
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


#: model settings a resumed run may change (everything else must match the checkpoint)
RESUME_MAY_CHANGE = ("backend", "dropout", "lstm_impl")


def _check_resumable(saved: DictConfig, config: DictConfig) -> None:
    """Raise ConfigError when ``config`` changes what the checkpoint was built with."""
    if saved.task.name != config.task.name:
        raise ConfigError(
            f"cannot resume a {saved.task.name} run as task {config.task.name}; start a new run"
        )
    old, new = to_container(saved.model), to_container(config.model)
    changed = [
        f"model.{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key)
    ]
    if changed:
        raise ConfigError(
            "the model cannot change when resuming (" + "; ".join(changed) + "); start a new run"
        )


def _fmt(metrics: dict[str, float], keys: list[str] | None = None) -> str:
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
) -> dict[str, float]:
    """Metrics of ``model`` on ``split`` of ``task`` (``max_batches`` 0: the whole split)."""
    was_training = model.training
    model.eval()
    totals: dict[str, Tensor] = {}
    state = None
    for i, batch in enumerate(task.eval_batches(split, batch_size, bptt)):
        if max_batches and i >= max_batches:
            break
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
        run_dir: where the run's files go (created when missing).
        resume: continue from ``run_dir/last.pt``.
        dist: the process topology (single process by default).
        echo: where progress lines go (``print``-like; None: silent).
    """

    def __init__(
        self,
        config: DictConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        dist: DistContext | None = None,
        echo: Callable[[str], None] | None = print,
    ) -> None:
        self.config = config
        self.model_cfg = section(config, "model")
        self.optim_cfg = section(config, "optim")
        self.train_cfg = section(config, "train")
        self.dist = dist or DistContext.single()
        self.run = rd.RunDir(run_dir, self.dist.is_main)
        self._echo = echo
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

        checkpoint = self._load_shared(rd.LAST) if resume else None
        if checkpoint is not None:
            _check_resumable(OmegaConf.create(checkpoint["config"]), config)
        options = OmegaConf.to_object(config.task)
        try:
            self.task = task_class(config.task.name)(options, seed=tc.seed)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if checkpoint is not None:
            self.task.load_state_dict(checkpoint["task"])
        try:
            self.task.prepare()
        except ValueError as error:  # options that do not fit the data (DataError passes)
            raise ConfigError(str(error)) from None

        if checkpoint is not None:
            meta = checkpoint["model_meta"]
            self.sizing = Sizing(
                meta["family"], meta["hidden_size"], meta["params"], meta["target"]
            )
        else:
            try:
                self.sizing = size_model(self.model_cfg, self.task.build_model)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if not tc.threads and self.device.type == "cpu" and self.sizing.params < SMALL_MODEL:
            torch.set_num_threads(1)  # tiny recurrent models run fastest on one thread
        self.model = self.task.build_model(self.model_cfg, self.sizing.hidden_size).to(self.device)
        if self.dist.rank:  # its own dropout masks (the model is rank 0's: DDP broadcasts it)
            rd.seed_everything(tc.seed + 7919 * self.dist.rank)
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

        # progress (all of it is in the checkpoint)
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

        if checkpoint is not None:
            self._restore(checkpoint)
            self.run.truncate_records(self.global_step)
            del checkpoint
        else:
            self.run.create()
            self.run.write_json(rd.ENVIRONMENT, rd.environment(self.device))
        self.run.write_text(rd.CONFIG, format_config(config))  # with a resume's overrides
        self.net: torch.nn.Module = self.model  # what training calls: DDP over the processes
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)

    def _load_shared(self, name: str, missing_ok: bool = False) -> dict[str, Any] | None:
        """Rank 0 reads checkpoint ``name`` and sends it to every rank (same errors everywhere);
        None when it is missing and ``missing_ok``."""
        result: Any = None
        if self.dist.is_main:
            try:
                if missing_ok and not (self.run / name).exists():
                    result = ("ok", None)
                else:
                    result = ("ok", self.run.load_checkpoint(name))
            except (FileNotFoundError, ValueError) as error:
                result = (type(error).__name__, str(error))
        result = self.dist.broadcast(result)
        if result[0] == "FileNotFoundError":
            raise FileNotFoundError(result[1])
        if result[0] != "ok":
            raise rd.CheckpointError(result[1])
        return result[1]

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
                    None if any(c is None for c in carries)
                    else [torch.cat(parts, dim=-2) for parts in zip(*carries)]
                )  # fmt: skip
            self.run.save_checkpoint(name, payload)
        if full:
            self.last_checkpoint_step = self.global_step

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
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
            kept = (f"the last good checkpoint is {self.run / rd.LAST} (step "
                    f"{self.last_checkpoint_step})")  # fmt: skip
        self.run.log({"event": "diverged", "epoch": self.epoch + 1, "step": step, "what": what,
                      "value": value})  # fmt: skip
        return TrainingDiverged(
            f"the {what} became {value} at step {step} (epoch {self.epoch + 1}); training stopped "
            f"and {kept}. Try a lower optim.lr or a smaller optim.grad_clip"
        )

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
        values = torch.stack(
            [loss.detach().double(), *(stats[k].to(loss.device).double() for k in keys)]
        )
        if self.dist.world_size > 1:  # sums over the ranks; the loss: the mean of equal shards
            values = self.dist.all_reduce_tensor(values)
            values[0] /= self.dist.world_size
        values = values.tolist()
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
        _test_crash(self.dist.rank, self.global_step)
        step_stats = dict(zip(keys, values[1:]))
        self._accumulate(self.epoch_stats, step_stats)
        self._accumulate(self.log_stats, step_stats)
        if self.global_step % tc.log_every == 0:
            record = {"event": "train", "epoch": self.epoch + 1, "step": self.global_step,
                      "lr": self.schedule.lr, "grad_norm": grad_norm}  # fmt: skip
            record.update(self.task.metrics(self.log_stats))
            self.run.log(record)
            self.log_stats = {}
        return values[0], grad_norm

    def evaluate(self, split: str = "valid", max_batches: int | None = None) -> dict[str, float]:
        """Metrics of the current model on ``split`` (``max_batches`` None: train.eval_max_batches)."""
        if max_batches is None:
            max_batches = self.train_cfg.eval_max_batches
        return evaluate(
            self.model, self.task, split, self.eval_batch_size, self.train_cfg.bptt, self.device,
            max_batches, self.dist,
        )  # fmt: skip

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.steps_per_epoch, initial=self.step_in_epoch, leave=False,
            desc=f"epoch {self.epoch + 1}/{self.train_cfg.epochs}", file=sys.stderr,
            disable=not (self.train_cfg.progress and self.dist.is_main), dynamic_ncols=True,
            mininterval=0.25,
        )  # fmt: skip

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
        """Evaluate, keep the best, checkpoint; True when early stopping says stop."""
        self.epoch += 1
        self.step_in_epoch = 0
        train_metrics = self.task.metrics(self.epoch_stats) if self.epoch_stats else {}
        self.epoch_stats = {}
        started = time.perf_counter()
        valid = self.evaluate("valid")
        self.elapsed += time.perf_counter() - started
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
        self.run.log({"event": "epoch", "epoch": self.epoch, "step": self.global_step,
                      "lr": self.schedule.lr, "train": train_metrics, "valid": valid,
                      "best": better})  # fmt: skip
        self.save(rd.LAST)
        seconds = time.perf_counter() - epoch_started
        keys = [k for k in valid if k != "baseline"]
        self.log(
            f"epoch {self.epoch:>{len(str(self.train_cfg.epochs))}}/{self.train_cfg.epochs}"
            f" | train {_fmt(train_metrics, [k for k in keys if k in train_metrics])}"
            f" | valid {_fmt(valid, keys)} | lr {self.schedule.lr:.2g} | {seconds:.1f}s"
            + ("  *" if better else "")
        )
        patience = self.train_cfg.early_stopping
        return bool(patience and self.bad_epochs >= patience)

    def fit(self, stop_at: int | None = None) -> Summary:
        """Train to the end (or to global step ``stop_at``, leaving a checkpoint to resume from)."""
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
            if self._end_epoch(epoch_started):
                reason = "early_stopping"
                self.log(f"early stopping: no improvement in {tc.early_stopping} epochs")
                break
        if reason == "stopped":
            self.run.log({"event": "stopped", "step": self.global_step, "epoch": self.epoch + 1})
            return Summary(self.run.path, reason, self.epoch, self.global_step, self.elapsed,
                           self.best_epoch, self.best_metrics, {}, self.task.primary_metric)  # fmt: skip
        test: dict[str, float] = {}
        if tc.test:
            test = self.test()
        summary = Summary(self.run.path, reason, self.epoch, self.global_step, self.elapsed,
                          self.best_epoch, self.best_metrics, test, self.task.primary_metric)  # fmt: skip
        self.run.write_json(rd.SUMMARY, {
            "reason": reason, "epochs": self.epoch, "steps": self.global_step,
            "elapsed_s": round(self.elapsed, 2), "best_epoch": self.best_epoch,
            "valid": self.best_metrics, "test": test, "primary_metric": self.task.primary_metric,
            "params": self.sizing.params, "hidden_size": self.sizing.hidden_size,
        })  # fmt: skip
        return summary

    def test(self) -> dict[str, float]:
        """Evaluate the best checkpoint (or the current model) on the test split."""
        source = "best checkpoint"
        best = self._load_shared(rd.BEST, missing_ok=True)
        if best is not None:
            try:
                self.model.load_state_dict(best["model"])
            except (KeyError, RuntimeError) as error:
                raise rd.CheckpointError(
                    f"{self.run / rd.BEST} does not fit the model ({type(error).__name__})"
                ) from None
        else:
            source = "current model"
        metrics = self.evaluate("test", max_batches=0)
        self.run.log({"event": "test", "step": self.global_step, "source": source, **metrics})
        return metrics


def _test_crash(rank: int, step: int) -> None:
    """Test hook: ``NESTRNN_TEST_CRASH=RANK:STEP`` kills rank RANK after step STEP, once (only in
    the first attempt of an elastic job), to check that torchrun's restarts resume the run."""
    spec = os.environ.get("NESTRNN_TEST_CRASH")
    if not spec or restart_count() > 0:
        return
    crash_rank, _, crash_step = spec.partition(":")
    if int(crash_rank) == rank and int(crash_step) == step:
        sys.stderr.write(f"NESTRNN_TEST_CRASH: rank {rank} exits after step {step}\n")
        sys.stderr.flush()
        os._exit(1)
