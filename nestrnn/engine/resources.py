"""Will a run fit in memory? An estimate made before anything is allocated or written.

The estimate is deliberately a lower bound (float32 parameters, their gradients and optimizer
state, plus the activations a recurrent model keeps for backpropagation through a batch), so that a
run is refused only when it cannot fit, with a message giving the estimate and the limit: the
available RAM (``MemAvailable`` of ``/proc/meminfo``, or psutil) on a CPU, the free memory of the
GPU on CUDA. Where neither can be read nothing is refused.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from nestrnn.config import ConfigError, ModelConfig

#: bytes per parameter: float32 weights, gradients and the optimizer's state (Adam keeps two
#: moments, SGD one momentum buffer)
BYTES_PER_PARAMETER = {"adam": 16, "sgd": 12}
#: float32 values a recurrent level keeps per unit, time step and sequence for the backward pass
#: (four gates, the cell, its tanh and the output; the memory functions keep at least that)
ACTIVATIONS_PER_UNIT = 7
FLOAT32 = 4


@dataclass(frozen=True)
class Workload:
    """What a training step holds in memory, in the terms of the configuration."""

    params: int
    optimizer: str
    batch_size: int  # sequences per process
    steps: int  # time steps backpropagated through
    hidden_size: int
    levels: int  # recurrent levels: layers times memory depth

    @property
    def bytes(self) -> int:
        state = self.params * BYTES_PER_PARAMETER.get(self.optimizer, FLOAT32)
        cells = self.batch_size * self.steps * self.hidden_size * self.levels
        return state + cells * ACTIVATIONS_PER_UNIT * FLOAT32


def recurrent_levels(cfg: ModelConfig) -> int:
    """The recurrent levels a step runs through: ``num_layers`` LSTM layers, times the memory
    depth for ``nlstm`` and ``stacked_lstm``."""
    if cfg.family == "lstm":
        return cfg.num_layers
    depth = cfg.memory.get("depth", cfg.depth) if isinstance(cfg.memory, Mapping) else cfg.depth
    return cfg.num_layers * depth if isinstance(depth, int) and depth > 0 else cfg.num_layers


def minimum_parameters(cfg: ModelConfig) -> int:
    """A lower bound on the parameters of any model of ``cfg`` (one 4H x H recurrent matrix per
    layer), known before the model is built: a model too large to build is refused at once."""
    return 4 * cfg.hidden_size * cfg.hidden_size * cfg.num_layers


def available_bytes(device: torch.device) -> int | None:
    """Memory a run may use on ``device``: free GPU memory, or available RAM (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def check_fits(work: Workload, device: torch.device) -> None:
    """Raise ConfigError when ``work`` needs more memory than ``device`` has available.

    CPU processes of one machine share its RAM: each may use its share of it."""
    limit = available_bytes(device)
    if limit is None:
        return
    where = f"GPU memory free on {device}"
    if device.type == "cpu":
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        limit //= max(sharing, 1)
        where = "RAM available" + (f" to each of {sharing} processes" if sharing > 1 else "")
    if work.bytes > limit:
        raise ConfigError(
            f"this run needs at least {format_size(work.bytes)} of memory ({work.params:,} parameters "
            f"with {work.optimizer} state, batch {work.batch_size} x {work.steps} steps x hidden "
            f"{work.hidden_size} x {work.levels} levels of activations) but {format_size(limit)} of "
            f"{where}; lower model.hidden_size, train.batch_size or train.bptt"
        )


def format_size(count: int) -> str:
    """``count`` bytes for a person: ``512 bytes``, ``1.5 GiB``."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{count} bytes" if unit == 0 else f"{value:.1f} {units[unit]}"
