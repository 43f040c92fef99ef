"""Loading a finished (or running) run for evaluation, sampling and visualisation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nestrnn.config import check_same_model, load_config, load_yaml, section, trained_config
from nestrnn.engine import rundir as rd
from nestrnn.engine import runfiles
from nestrnn.engine.build import build_task, load_weights, model_settings
from nestrnn.engine.trainer import resolve_device


@dataclass
class LoadedRun:
    config: DictConfig
    task: Any
    model: torch.nn.Module
    checkpoint: dict[str, Any]
    path: Path
    device: torch.device


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """``best`` / ``last`` in ``run_dir``, or a path to a checkpoint file."""
    if which in ("best", "last"):
        path = run_dir / (rd.BEST if which == "best" else rd.LAST)
        if which == "best" and not os.path.lexists(path) and os.path.lexists(run_dir / rd.LAST):
            return run_dir / rd.LAST  # no epoch finished yet
        return path
    return Path(which)


def load_run(
    run_dir: str | Path,
    which: str = "best",
    overrides: Sequence[str] = (),
    device: str | None = None,
    prepare: bool = True,
) -> LoadedRun:
    """Rebuild the task and model of a run from its checkpoint (and its config, with overrides).

    The model is the checkpoint's: a ``config.yaml`` or an override that changes it is a
    ConfigError (only ``model.backend``, ``model.dropout`` and ``model.lstm_impl`` may differ).
    ``prepare=False`` skips loading the data set (enough for sampling from a language model).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise rd.RunDirError(f"no run directory {run_dir}")
    # a mistaken --device is reported before anything is loaded
    chosen = None if device is None else resolve_device(device, "--device")
    path = checkpoint_path(run_dir, which)
    # a file named with --checkpoint may be a link; the run's own files are never followed
    checkpoint = rd.load_checkpoint(path, "cpu", follow_links=which not in ("best", "last"))
    trained = trained_config(checkpoint["config"])
    saved = run_dir / rd.CONFIG
    if os.path.lexists(saved):
        runfiles.check_regular(saved, rd.RunDirError)
        base = OmegaConf.to_container(load_yaml(saved))
        _check_same_model(trained, load_config([], [], base=base), f"{saved} (edited?)", path)
    else:
        base = OmegaConf.to_container(trained)
    config = load_config([], list(overrides), base=base)
    _check_same_model(trained, config, "the overrides", path)
    torch_device = resolve_device(config.train.device) if chosen is None else chosen
    task = build_task(config, checkpoint["task"], prepare)
    with model_settings():
        model = task.build_model(section(config, "model"), checkpoint["model_meta"]["hidden_size"])
    load_weights(model, checkpoint["model"], path)
    model.to(torch_device).eval()
    return LoadedRun(config, task, model, checkpoint, path, torch_device)


def _check_same_model(trained: DictConfig, config: DictConfig, source: str, path: Path) -> None:
    check_same_model(
        trained,
        config,
        lambda changes: (
            f"{source} would change the model trained in {path} ({changes}); the "
            "checkpoint fixes the task and the model"
        ),
    )
