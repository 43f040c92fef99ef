"""Where a run's numbers go: a small logger interface, its ``metrics.jsonl`` and TensorBoard
implementations, and the list of loggers the trainer calls.

The trainer calls every enabled :class:`Logger` (rank 0 only; under torchrun the other processes
have none):

* ``start(config, run_dir, step)`` once per :meth:`~nestrnn.engine.trainer.Trainer.fit`, with the
  optimizer step the run continues from (0 for a new run; a logger that appends to earlier
  output drops what it holds after that step, as ``metrics.jsonl`` does);
* ``log_record(record)`` with each ``metrics.jsonl`` record (``train``, ``epoch``, ``test``,
  ``stopped``, ``diverged``) as it is written;
* ``log_metrics(step, metrics, split)``: ``split`` is ``train`` (every ``train.log_every``
  steps: the metrics, ``lr`` and ``grad_norm``), ``valid`` (after each epoch), ``test`` (the
  final test) or ``best`` (when the run ends: the best validation metrics);
* ``log_timescales(step, timescales)`` after each validation (with ``log.timescales``): each
  memory level's e-folding lag (see :mod:`nestrnn.analysis`), by level name;
* ``close()`` when :meth:`fit` ends, however it ends.

Every method has a do-nothing default. ``log.loggers`` names loggers that plugins registered
with the ``register_loggers`` hook; a plugin's logger that raises is reported once on stderr and
left out for the rest of the run: a broken dashboard never stops training. The ``metrics.jsonl``
logger is the run's record and is not guarded: a write that fails there stops the run as before.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nestrnn.config import ConfigError, LogConfig, to_container
from nestrnn.engine import rundir as rd

#: the scalar each level's timescale is logged as (see :class:`nestrnn.analysis.Timescale`)
TIMESCALE_STATISTIC = "efold_lag"
#: the sub-directory of the run directory that holds TensorBoard's event files
TENSORBOARD_DIR = "tensorboard"
#: rows and steps of the validation batch the timescales are measured on
TIMESCALE_ROWS = 8
TIMESCALE_STEPS = 200


class Logger:
    """Receives a run's numbers (see the module docstring); every method is optional."""

    #: whether :meth:`log_timescales` does anything (the trainer measures them only if some
    #: enabled logger wants them)
    wants_timescales: bool = True

    def start(self, config: DictConfig, run_dir: Path, step: int = 0) -> None:
        """The run begins (``step`` 0) or resumes at optimizer step ``step``."""

    def log_record(self, record: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` record, as written there."""

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        """Metrics of ``split`` (train, valid, test or best) at optimizer step ``step``."""

    def log_timescales(self, step: int, timescales: dict[str, float]) -> None:
        """Each memory level's timescale (level name -> steps) at optimizer step ``step``."""

    def close(self) -> None:
        """The run ends (finished, stopped or failed)."""


class JsonlLogger(Logger):
    """The run's ``metrics.jsonl``: one JSON record per line (see :mod:`nestrnn.engine.rundir`)."""

    wants_timescales = False

    def __init__(self, run: rd.RunDir) -> None:
        self.run = run

    def log_record(self, record: dict[str, Any]) -> None:
        self.run.log(record)


def flat_hparams(config: DictConfig) -> dict[str, Any]:
    """The configuration as ``{"optim.lr": 0.005, ...}`` with values TensorBoard's hparams
    accept (numbers, strings, booleans; anything else as its text)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix[:-1]] = node
        else:  # None, lists
            flat[prefix[:-1]] = "null" if node is None else str(node)

    walk(to_container(config), "")
    return flat


def tag(name: str) -> str:
    """A level name as a TensorBoard tag part: ``"outer c0"`` -> ``"outer_c0"``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "level"


class TensorBoardLogger(Logger):
    """Event files under ``RUN_DIR/tensorboard/``: scalars ``<split>/<metric>``, the timescales as
    ``timescale/<level>`` and, when the run ends, the configuration as hparams with the best
    validation and test metrics. A resumed run appends, dropping points after its step."""

    name = "tensorboard"  # in the warning when it fails

    def __init__(self) -> None:
        try:  # here, not at import: nestrnn starts without TensorBoard's import cost
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "log.tensorboard=true needs the tensorboard package: "
                "pip install 'nestrnn[tensorboard]'"
            ) from None
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self._config: DictConfig | None = None
        self._final: dict[str, float] = {}

    def start(self, config: DictConfig, run_dir: Path, step: int = 0) -> None:
        self._config = config
        # purge_step: TensorBoard drops the points an earlier attempt wrote after the checkpoint
        purge = step + 1 if step else None
        self._writer = self._writer_class(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{split}/{key}", value, step)
        if split in ("best", "test"):
            self._final.update({f"{split}/{k}": v for k, v in metrics.items()})
        self._writer.flush()

    def log_timescales(self, step: int, timescales: dict[str, float]) -> None:
        for level, value in timescales.items():
            self._writer.add_scalar(f"timescale/{tag(level)}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        if self._final and self._config is not None:
            from torch.utils.tensorboard.summary import hparams

            metrics = {k: v for k, v in self._final.items() if math.isfinite(v)}
            for summary in hparams(flat_hparams(self._config), metrics):
                self._writer.file_writer.add_summary(summary)
        self._writer.close()
        self._writer = None


class Loggers:
    """The enabled loggers, called in order; a guarded one that raises is reported once on
    stderr and disabled (the others carry on)."""

    def __init__(
        self,
        loggers: Iterable[Logger],
        guarded: dict[int, str] | None = None,
        timescales: bool = True,
    ) -> None:
        self.loggers = list(loggers)
        self.timescales = timescales  # log.timescales
        #: id of each guarded logger -> the name its warning uses
        self._guarded = dict(guarded or {})

    @property
    def wants_timescales(self) -> bool:
        """Whether measuring the timescales is worth it: asked for, and some logger takes them."""
        return self.timescales and any(
            getattr(logger, "wants_timescales", True) for logger in self.loggers
        )

    def start(self, config: DictConfig, run_dir: Path, step: int) -> None:
        self._call("start", config, run_dir, step)

    def log_record(self, record: dict[str, Any]) -> None:
        self._call("log_record", record)

    def log_metrics(self, step: int, metrics: dict[str, float], split: str) -> None:
        self._call("log_metrics", step, dict(metrics), split)

    def log_timescales(self, step: int, timescales: dict[str, float]) -> None:
        self._call("log_timescales", step, dict(timescales))

    def close(self) -> None:
        self._call("close")

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            if id(logger) not in self._guarded:
                getattr(logger, method)(*args)
                continue
            try:
                getattr(logger, method)(*args)
            except Exception as error:  # a dashboard's fault must not stop the training
                self.disable(logger, f"{method}: {type(error).__name__}: {error}")

    def disable(self, logger: Logger, why: str) -> None:
        """Leave ``logger`` out from now on, saying so in one line on stderr."""
        self.loggers.remove(logger)
        warn_disabled(self._guarded.get(id(logger)) or type(logger).__name__, why)


def warn_disabled(name: str, why: str) -> None:
    """The one line on stderr that says logger ``name`` failed and is left out."""
    print(
        f"warning: logger {name!r} failed ({why}); it is disabled for the rest of the run",
        file=sys.stderr,
    )


def build_loggers(config: DictConfig, run: rd.RunDir, is_main: bool) -> Loggers:
    """The loggers ``config`` enables (none on processes other than rank 0). Checks everything
    now, before the run writes anything: an unknown ``log.loggers`` name or TensorBoard missing is
    a :class:`ConfigError`."""
    log = config.get("log") or LogConfig()  # a configuration built without the log section
    if not is_main:
        return Loggers([])
    loggers: list[Logger] = [JsonlLogger(run)]
    guarded: dict[int, str] = {}
    if log.tensorboard:
        board = TensorBoardLogger()
        loggers.append(board)
        guarded[id(board)] = board.name
    names = list(log.loggers)
    if names:
        from nestrnn.registry import RegistryError, get_logger

        for name in names:
            try:
                entry = get_logger(str(name))
            except RegistryError as error:
                raise ConfigError(f"log.loggers: {error}") from None
            made = _make_plugin_logger(entry.factory, str(name))
            if made is not None:
                loggers.append(made)
                guarded[id(made)] = str(name)
    return Loggers(loggers, guarded, timescales=bool(log.timescales))


def _make_plugin_logger(factory: Any, name: str) -> Logger | None:
    """``factory()``, named ``name``; None, with the one-line warning, when it raises."""
    try:
        logger = factory()
    except Exception as error:
        warn_disabled(name, f"creating it: {type(error).__name__}: {error}")
        return None
    return logger
