"""Fault injection from the test side: ``python tests/faults.py FAULT -- NESTRNN ARGS...``.

Runs the ``nestrnn`` command line with one function of the package wrapped, so that tests can
crash a process or catch it at a precise moment without any hook in the package itself. Works as
a torchrun script too (``torchrun ... tests/faults.py FAULT -- train ...``). FAULT is one of:

``crash:RANK:STEP``
    rank RANK exits (status 1, no cleanup) right after optimizer step STEP, in the first attempt
    of an elastic job only (so that torchrun's restart can finish the run);
``pause-in-checkpoint:SECONDS``
    a write of a checkpoint that replaces an existing one sleeps SECONDS after its temporary file
    is complete and before ``os.replace``, having printed ``PAUSED-IN-CHECKPOINT <path>``;
``slow-eval:SPLIT:SECONDS``
    every batch of an evaluation on SPLIT (``valid``, ``test``) of a training run takes SECONDS
    more; the first one prints ``EVALUATING <split>`` on stderr first (stdout is left alone).
``crash-in-checkpoint``
    the first write of a checkpoint that replaces an existing one exits (status 1, no cleanup)
    when its temporary file is complete, before ``os.replace`` (a power cut at that moment).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PAUSED = "PAUSED-IN-CHECKPOINT"
EVALUATING = "EVALUATING"


def crash_after(rank: int, step: int) -> None:
    from nestrnn.engine.trainer import Trainer

    train_step = Trainer.train_step

    def crashing(self: Trainer) -> tuple[float, float]:
        result = train_step(self)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and self.dist.rank == rank and self.global_step == step:
            sys.stderr.write(f"fault: rank {rank} exits after step {step}\n")
            sys.stderr.flush()
            os._exit(1)
        return result

    Trainer.train_step = crashing


def pause_in_checkpoint(seconds: float) -> None:
    from nestrnn.engine import rundir

    atomic_write = rundir.atomic_write

    @contextlib.contextmanager
    def pausing(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
        path = Path(path)
        with atomic_write(path, mode) as handle:
            yield handle
            if path.suffix == ".pt" and path.exists():
                handle.flush()
                print(f"{PAUSED} {path}", flush=True)
                time.sleep(seconds)

    rundir.atomic_write = pausing


def slow_eval(split: str, seconds: float) -> None:
    from nestrnn.engine import trainer

    evaluate = trainer.evaluate

    class SlowTask:
        def __init__(self, task: Any) -> None:
            self.task = task

        def __getattr__(self, name: str) -> Any:
            return getattr(self.task, name)

        def eval_batches(self, which: str, *args: Any) -> Iterator[Any]:
            for index, batch in enumerate(self.task.eval_batches(which, *args)):
                if which == split:
                    if index == 0:
                        print(f"{EVALUATING} {split}", file=sys.stderr, flush=True)
                    time.sleep(seconds)
                yield batch

    def slow(model: Any, task: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        return evaluate(model, SlowTask(task), *args, **kwargs)

    trainer.evaluate = slow


def crash_in_checkpoint() -> None:
    from nestrnn.engine import rundir

    atomic_write = rundir.atomic_write

    @contextlib.contextmanager
    def crashing(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
        path = Path(path)
        with atomic_write(path, mode) as handle:
            yield handle
            if path.suffix == ".pt" and path.exists():
                handle.flush()
                sys.stderr.write(f"fault: exit while replacing {path}\n")
                sys.stderr.flush()
                os._exit(1)

    rundir.atomic_write = crashing


def main(argv: list[str]) -> int:
    fault, separator, *command = argv
    assert separator == "--", "usage: faults.py FAULT -- NESTRNN ARGS..."
    kind, *values = fault.split(":")
    if kind == "crash":
        crash_after(int(values[0]), int(values[1]))
    elif kind == "pause-in-checkpoint":
        pause_in_checkpoint(float(values[0]))
    elif kind == "slow-eval":
        slow_eval(values[0], float(values[1]))
    elif kind == "crash-in-checkpoint":
        crash_in_checkpoint()
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from nestrnn.cli import main as nestrnn

    return nestrnn(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
