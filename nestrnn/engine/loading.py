"""Loading a finished (or running) run for evaluation and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nestrnn.config import load_config, load_yaml, section, task_class
from nestrnn.engine import rundir as rd
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
        if which == "best" and not path.exists() and (run_dir / rd.LAST).exists():
            return run_dir / rd.LAST  # no epoch finished yet
        return path
    return Path(which)


def load_run(
    run_dir: str | Path,
    which: str = "best",
    overrides: tuple[str, ...] | list[str] = (),
    device: str | None = None,
    prepare: bool = True,
) -> LoadedRun:
    """Rebuild the task and model of a run from its checkpoint (and its config, with overrides).

    ``prepare=False`` skips loading the data set (enough for sampling from a language model).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    path = checkpoint_path(run_dir, which)
    checkpoint = rd.load_checkpoint(path, "cpu")
    saved = run_dir / rd.CONFIG
    base = OmegaConf.to_container(
        load_yaml(saved) if saved.exists() else OmegaConf.create(checkpoint["config"])
    )
    config = load_config([], list(overrides), base=base)
    torch_device = resolve_device(device or config.train.device)
    task = task_class(config.task.name)(OmegaConf.to_object(config.task), seed=config.train.seed)
    task.load_state_dict(checkpoint["task"])
    if prepare:
        task.prepare()
    hidden = checkpoint["model_meta"]["hidden_size"]
    model = task.build_model(section(config, "model"), hidden)
    model.load_state_dict(checkpoint["model"])
    model.to(torch_device).eval()
    return LoadedRun(config, task, model, checkpoint, path, torch_device)
