"""Synthetic long-range tasks generated in-process (no download): copy memory and adding.

Both draw fresh training examples for every batch from a generator seeded by (seed, batch index),
so training data never repeats and a resumed run sees exactly the same batches. Validation and
test sets are fixed samples drawn from their own seeds.

Copy memory (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016). The input is ``length``
symbols drawn from ``symbols`` letters (tokens 1..symbols), then ``delay`` blanks (token 0), then a
delimiter (token symbols+1), then ``length`` blanks: ``delay + 2 * length + 1`` steps (Arjovsky et
al.'s T is ``delay + 1``). The target is blank everywhere except the last ``length`` steps (after
the delimiter), which must reproduce the symbols in order. The loss is the cross-entropy over
all steps; ``error`` is the percentage of copied symbols predicted wrongly (chance: 1 - 1/symbols),
and ``baseline`` the loss of the best memoryless guess, length*ln(symbols)/T.

Adding problem (Hochreiter & Schmidhuber 1997). Each step has two inputs: a value uniform in [0, 1]
and a marker; exactly two steps are marked, one in each half of the sequence. The target is the sum
of the two marked values, read from the last state. Loss: mean squared error (``mse``; predicting
1 always gives about 0.167); ``error``: percentage of sequences predicted off by more than 0.04.

The validation and test sets are held in memory: a configuration whose sets cannot fit in the RAM
available is refused before they are generated, naming the options and how far they may go.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from nestrnn.tasks.base import Batch, Task, TaskOptions
from torch import Tensor, nn

from nestrnn.config import ConfigError, ModelConfig
from nestrnn.engine.batching import generator
from nestrnn.engine.resources import available_bytes, format_size
from nestrnn.models import SequenceModel, TokenModel

SPLIT_SEEDS = {"valid": 1, "test": 2}
TRAIN_STREAM = 0


class SyntheticTask(Task):
    """Shared batching of the generated tasks."""

    #: bytes one time step of a generated sequence holds (inputs and targets)
    step_bytes: ClassVar[int] = 16
    #: the fewest steps the options allow, and how they give the number of steps
    min_steps: ClassVar[int] = 1
    steps_option: ClassVar[str] = "task.length"
    steps: int

    def __init__(self, options: Any, seed: int = 0) -> None:
        super().__init__(options, seed)
        for key in ("valid_size", "test_size", "train_batches"):
            if getattr(options, key) <= 0:
                raise ValueError(f"task.{key} must be positive, got {getattr(options, key)}")
        self._eval: dict[str, tuple[Tensor, Tensor]] = {}

    def sample(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def check_memory(self) -> None:
        """Raise ConfigError when the validation and test sets cannot fit in the RAM available
        (a lower bound: what the sets hold, not the temporaries of generating them)."""
        limit = available_bytes(torch.device("cpu"))
        if limit is None:
            return
        # every process of a machine generates its own sets, as each holds its own model
        sharing = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
        limit //= sharing
        count = self.options.valid_size + self.options.test_size
        need = count * self.steps * self.step_bytes
        if need <= limit:
            return
        most_steps = limit // (count * self.step_bytes)
        most_count = limit // (self.steps * self.step_bytes)
        ways = []
        if most_steps >= self.min_steps:
            ways.append(f"lower {self.steps_option} to at most {most_steps:,}")
        if most_count >= 2:
            ways.append(f"lower task.valid_size + task.test_size to at most {most_count:,}")
        where = "RAM available" + (f" to each of {sharing} processes" if sharing > 1 else "")
        raise ConfigError(
            f"the generated validation and test sets need {format_size(need)} ({count:,} "
            f"sequences of {self.steps:,} steps) but {format_size(limit)} of {where}; "
            + (" or ".join(ways) or f"lower {self.steps_option} and the set sizes")
        )

    def prepare(self) -> None:
        self.check_memory()
        for split, key in SPLIT_SEEDS.items():
            size = getattr(self.options, f"{split}_size")
            self._eval[split] = self.sample(size, generator(self.seed, key))

    def num_train_batches(self, batch_size: int, bptt: int) -> int:
        return self.options.train_batches

    def train_batch(self, index: int, batch_size: int, bptt: int) -> Batch:
        x, y = self.sample(batch_size, generator(self.seed, TRAIN_STREAM, index))
        return Batch(x, y)

    def eval_batches(self, split: str, batch_size: int, bptt: int) -> Iterator[Batch]:
        x, y = self._eval[split]
        for start in range(0, len(x), batch_size):
            yield Batch(x[start : start + batch_size], y[start : start + batch_size])


@dataclass
class CopyMemoryOptions(TaskOptions):
    name: str = "copy_memory"  # the task
    symbols: int = 8  # alphabet size of the sequence to copy
    length: int = 10  # symbols to remember and copy
    delay: int = 20  # blanks between the symbols and the delimiter
    train_batches: int = 1000  # batches in one "pass" (data is infinite: fresh samples each batch)
    valid_size: int = 1000  # fixed validation sequences
    test_size: int = 1000  # fixed test sequences


class CopyMemoryTask(SyntheticTask):
    """Copy memory: recall a sequence of symbols after a delay (synthetic, no download)."""

    Options: ClassVar[type] = CopyMemoryOptions
    kind: ClassVar[str] = "classify"
    primary_metric: ClassVar[str] = "error"
    step_bytes: ClassVar[int] = 16  # an int64 input and an int64 target
    min_steps: ClassVar[int] = 3
    steps_option: ClassVar[str] = "task.delay + 2 * task.length + 1"

    def __init__(self, options: CopyMemoryOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        if options.symbols < 2 or options.length < 1 or options.delay < 0:
            raise ValueError("copy_memory needs symbols >= 2, length >= 1 and delay >= 0")
        self.steps = options.delay + 2 * options.length + 1

    def sample(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        o = self.options
        symbols = torch.randint(1, o.symbols + 1, (count, o.length), generator=gen)
        x = torch.zeros(count, self.steps, dtype=torch.long)
        y = torch.zeros(count, self.steps, dtype=torch.long)
        x[:, : o.length] = symbols
        x[:, o.length + o.delay] = o.symbols + 1
        y[:, -o.length :] = symbols
        return x, y

    def build_model(self, model_cfg: ModelConfig, hidden_size: int) -> nn.Module:
        n = self.options.symbols
        return TokenModel(model_cfg, n + 2, n + 1, hidden_size)

    def describe(self) -> str:
        o = self.options
        return (
            f"{o.length} of {o.symbols} symbols, delay {o.delay} ({self.steps} steps); "
            f"memoryless baseline loss {self.baseline():.4f}"
        )

    def baseline(self) -> float:
        o = self.options
        return o.length * math.log(o.symbols) / self.steps

    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = output.float()
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), reduction="sum"
        )
        length = self.options.length
        recall = logits[:, -length:].argmax(-1) != batch.targets[:, -length:]
        stats = {
            "nll": nll.detach(),
            "count": torch.tensor(float(batch.targets.numel())),
            "wrong": recall.sum().detach().float(),
            "recalled": torch.tensor(float(recall.numel())),
        }
        return nll / batch.targets.numel(), stats

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        return {
            "loss": stats["nll"] / max(stats["count"], 1.0),
            "error": 100.0 * stats["wrong"] / max(stats["recalled"], 1.0),
            "baseline": self.baseline(),
        }


@dataclass
class AddingOptions(TaskOptions):
    name: str = "adding"  # the task
    length: int = 30  # sequence length T (the literature also uses 50, 100, 200, ...)
    train_batches: int = 1000  # batches in one "pass" (data is infinite: fresh samples each batch)
    valid_size: int = 1000  # fixed validation sequences
    test_size: int = 1000  # fixed test sequences


class AddingTask(SyntheticTask):
    """Adding problem: sum the two marked numbers of a long sequence (synthetic, no download)."""

    Options: ClassVar[type] = AddingOptions
    kind: ClassVar[str] = "regress"
    primary_metric: ClassVar[str] = "mse"
    step_bytes: ClassVar[int] = 8  # a float32 value and a float32 marker
    min_steps: ClassVar[int] = 2

    def __init__(self, options: AddingOptions, seed: int = 0) -> None:
        super().__init__(options, seed)
        if options.length < 2:
            raise ValueError(f"task.length must be at least 2, got {options.length}")
        self.steps = options.length

    def sample(self, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        t = self.options.length
        half = t // 2
        values = torch.rand(count, t, generator=gen)
        first = torch.randint(0, half, (count,), generator=gen)
        second = torch.randint(half, t, (count,), generator=gen)
        marks = torch.zeros(count, t)
        rows = torch.arange(count)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        target = values[rows, first] + values[rows, second]
        return torch.stack([values, marks], dim=-1), target

    def build_model(self, model_cfg: ModelConfig, hidden_size: int) -> nn.Module:
        return SequenceModel(model_cfg, 2, 1, hidden_size, "last")

    def describe(self) -> str:
        return (
            f"sequences of {self.options.length} steps; predicting 1 gives mse ~0.167, where "
            "training plateaus until the network learns to hold the two marked numbers"
        )

    def loss(self, output: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        prediction = output.float().squeeze(-1)
        squared = (prediction - batch.targets) ** 2
        stats = {
            "se": squared.sum().detach(),
            "wrong": ((prediction - batch.targets).abs() > 0.04).sum().detach().float(),
            "count": torch.tensor(float(batch.targets.numel())),
        }
        return squared.mean(), stats

    def metrics(self, stats: dict[str, float]) -> dict[str, float]:
        count = max(stats["count"], 1.0)
        return {"mse": stats["se"] / count, "error": 100.0 * stats["wrong"] / count}
