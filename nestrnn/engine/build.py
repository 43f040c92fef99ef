"""Building a run's task and model from its configuration, for training, ``eval``, ``sample`` and
``viz`` alike.

The task and model constructors report a bad argument as ``ValueError``, ``TypeError`` or
``LookupError`` (an unknown memory function); here, at the point where configuration values meet
them, those become one-line :class:`~nestrnn.config.ConfigError` s. A checkpoint that does not fit
the model built from its configuration is a :class:`~nestrnn.engine.rundir.CheckpointError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from nestrnn.config import ConfigError, task_class
from nestrnn.engine.rundir import CheckpointError
from nestrnn.errors import UserError, one_line


def build_task(
    config: DictConfig, state: dict[str, Any] | None = None, prepare: bool = True
) -> Any:
    """The configured task, with a checkpoint's task ``state`` restored, its data loaded when
    ``prepare`` (a DataError when the data is missing or corrupt)."""
    options = OmegaConf.to_object(config.task)
    try:
        task = task_class(config.task.name)(options, seed=config.train.seed)
    except ValueError as error:  # the task's own check of its options
        raise ConfigError(one_line(error)) from None
    if state is not None:
        task.load_state_dict(state)
    if prepare:
        try:
            task.prepare()
        except ValueError as error:  # options that do not fit the data (DataError passes)
            raise ConfigError(one_line(error)) from None
    return task


@contextlib.contextmanager
def model_settings() -> Iterator[None]:
    """Inside this block, a model constructor's argument error is a ConfigError."""
    try:
        yield
    except UserError:  # already a one-line error (a ConfigError is a ValueError too)
        raise
    except RecursionError:
        raise ConfigError("the model is nested too deeply to be built; lower model.depth") from None
    except (ValueError, TypeError, LookupError) as error:
        raise ConfigError(f"invalid model settings: {one_line(error)}") from None


def load_weights(model: nn.Module, state: dict[str, Any], source: Path) -> None:
    """Load a checkpoint's model ``state``; a CheckpointError when it does not fit ``model``."""
    try:
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source} does not fit the model of its run: {first}") from None
