"""The task interface: what a task plugin provides to the training engine.

A task brings its data set, its model head, its loss and its metrics. Write one by subclassing
:class:`Task` and registering the class, in a script with ``@nestrnn.register_task("name")`` or in
an installed package with the ``register_tasks`` hook::

    @nestrnn.hookimpl
    def register_tasks(register):
        register("my_task", MyTask, "one line shown by `nestrnn tasks`")

What the engine calls, in order:

``Options``
    a dataclass of the task's options (the ``task:`` config section); subclass
    :class:`TaskOptions` (or :class:`DataOptions` for a task that reads files), give ``name`` the
    task's registered name as default and put a ``# comment`` after every field. Options with a
    fixed set of values list them in a ``CHOICES`` class variable (``{"order": ("row", ...)}``).
``config_defaults``
    a dict of other config values this task suggests (``{"train": {"bptt": 100}}``), applied
    before the user's YAML files and overrides.
``__init__(options, seed)``
    cheap: store the options; raise ``ValueError`` for invalid ones.
``prepare()``
    load the data, downloading it when missing and allowed; raise
    :class:`nestrnn.data_utils.DataError` when it is missing, corrupt or truncated.
``state_dict()`` / ``load_state_dict(state)``
    what a checkpoint must remember about the data (a vocabulary), as plain Python types.
``prepare_sizes()``
    instead of ``prepare()`` where only the model's size is wanted (``nestrnn train
    --print-params``): whatever ``build_model`` needs, without downloading or writing anything.
    The default does nothing (the model does not depend on the data).
``build_model(model_cfg, hidden_size)``
    the whole model: the head around :func:`nestrnn.models.build_recurrent`; usually
    :class:`nestrnn.models.TokenModel` or :class:`nestrnn.models.SequenceModel`. It must work on
    the ``meta`` device (models are sized there). ``model(inputs, state) -> (output, state)``.
``num_train_batches(batch_size, bptt)``
    batches in one pass over the training data (an epoch when ``train.steps_per_epoch`` is 0).
``train_batch(index, batch_size, bptt)``
    training batch number ``index`` counted from the start of training (a pure function of the
    index and the seed: this is the run's data position, and what makes resuming exact).
``eval_batches(split, batch_size, bptt)``
    the batches of ``"valid"`` or ``"test"``, in a fixed order.
``loss(output, batch)``
    ``(loss to minimise, stats)``: stats are summed quantities (detached tensors) that
    ``metrics`` turns into numbers, e.g. ``{"nll": sum of NLL, "count": tokens}``.
``metrics(stats)``
    a dict of named floats; ``primary_metric`` names the one that picks the best checkpoint
    (lower is better unless ``higher_is_better``).
``shard_batch(batch, rank, world_size)``
    the part of a batch one process trains on under data parallelism (default: its rows).
``data_fingerprint()``
    a digest of the data the task trains and evaluates on, kept in checkpoints so that a resumed
    run notices other data. The default digests the seed and the options that are not a location
    (a moved data set is the same data); tasks that read files add the content (see
    :func:`fingerprint`). None: nothing to compare.

Language-model tasks (``kind = "lm"``) also provide ``encode(text)`` / ``decode(ids)`` for
``nestrnn sample``; :class:`nestrnn.tasks.lm.CharLMTask` implements all of the above for a corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from nestrnn.config import ModelConfig

#: options that say where the data is, not what it is
LOCATION_OPTIONS = ("name", "data_dir", "download", "base_url", "path")


def fingerprint(*parts: Any) -> str:
    """sha256 of ``parts``: tensors by dtype, shape and bytes, anything else as sorted JSON."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            data = part.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{data.dtype}{tuple(part.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class TaskOptions:
    name: str = ""  # the task; `nestrnn tasks` lists them


@dataclass
class DataOptions(TaskOptions):
    data_dir: str = ""  # folder of the data files ("": $NESTRNN_DATA_DIR/<task> or ~/.cache/...)
    download: bool = True  # download missing files from the canonical location when there is one
    base_url: str = ""  # replace the canonical download location(s): comma-separated base URLs


@dataclass
class Batch:
    """One batch: model inputs and targets (batch-first), and whether the state carries over."""

    inputs: Tensor
    targets: Tensor
    carry: bool = False  # continue from the previous batch's final state (LM streams)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.carry,
        )

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]


class Task(ABC):
    """Base class of every task (see the module docstring)."""

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    #: "lm" (next-token language model; supports `nestrnn sample`), "classify" or "regress"
    kind: ClassVar[str] = "classify"
    #: the metric that selects the best checkpoint and drives early stopping
    primary_metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    #: whether the recurrent state is carried from one training batch to the next
    carries_state: ClassVar[bool] = False
    #: other config values this task suggests: {"train": {...}, "model": {...}, "optim": {...}}
    config_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: TaskOptions, seed: int = 0) -> None:
        self.options = options
        self.seed = seed

    @abstractmethod
    def prepare(self) -> None:
        """Load the data (downloading it when missing and allowed)."""

    def prepare_sizes(self) -> None:  # noqa: B027 - optional hook
        """What :meth:`build_model` needs, known without downloading or writing anything."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold about the data (plain Python types)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned (called before :meth:`prepare`)."""

    @abstractmethod
    def build_model(self, model_cfg: ModelConfig, hidden_size: int) -> nn.Module:
        """The model: ``model(inputs, state) -> (output, state)``."""

    @abstractmethod
    def num_train_batches(self, batch_size: int, bptt: int) -> int:
        """Batches in one pass over the training data."""

    @abstractmethod
    def train_batch(self, index: int, batch_size: int, bptt: int) -> Batch:
        """Training batch number ``index`` (from the start of training)."""

    @abstractmethod
    def eval_batches(self, split: str, batch_size: int, bptt: int) -> Iterator[Batch]:
        """The batches of ``split`` ("valid" or "test") in a fixed order."""

    @abstractmethod
    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss to minimise, summed statistics)`` for one batch."""

    @abstractmethod
    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        """Named metrics from summed statistics."""

    def shard_batch(self, batch: Batch, rank: int, world_size: int) -> Batch:
        """This process's part of ``batch`` under data parallelism: a contiguous block of rows."""
        if world_size == 1:
            return batch
        rows = batch.rows
        if rows % world_size:
            raise ValueError(f"batch of {rows} rows cannot be split over {world_size} processes")
        part = rows // world_size
        piece = slice(rank * part, (rank + 1) * part)
        return Batch(batch.inputs[piece], batch.targets[piece], batch.carry)

    def data_fingerprint(self) -> str | None:
        """A digest of the data (after :meth:`prepare`); see the module docstring."""
        options = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        shape = {k: v for k, v in options.items() if k not in LOCATION_OPTIONS}
        return fingerprint(self.seed, shape)

    def describe(self) -> str:
        """One line about the loaded data, printed at the start of training."""
        return ""

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
