"""Optimizers and the learning-rate schedule.

Schedules (``optim.schedule``), each with optional linear warm-up over ``optim.warmup_steps``:

* ``constant``: ``optim.lr`` throughout;
* ``plateau``: multiply by ``optim.decay`` when the validation metric has not improved for more than
  ``optim.patience`` epochs (``patience: 0`` decays after every epoch without improvement);
* ``step``: multiply by ``optim.decay`` after every epoch from epoch ``optim.decay_start`` on
  (Zaremba et al.'s PTB recipe);
* ``cosine``: cosine from ``optim.lr`` down to ``optim.min_lr`` over the planned training steps.

The learning rate is never below ``optim.min_lr``. The schedule's whole state is a small dict of
numbers, saved in every checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nestrnn.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"optim.name must be adam or sgd, got {cfg.name!r}")


class LRSchedule:
    """Sets the optimizer's learning rate before every step (see the module docstring)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = max(total_steps, 1)
        self.scale = 1.0  # the multiplicative decay so far (plateau / step)
        self.best: float | None = None
        self.bad_epochs = 0
        self.lr = cfg.lr

    def step(self, global_step: int) -> float:
        """Set and return the learning rate for optimizer step ``global_step`` (0-based)."""
        cfg = self.cfg
        lr = cfg.lr * self.scale
        if cfg.schedule == "cosine":
            progress = min(global_step / self.total_steps, 1.0)
            lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.warmup_steps and global_step < cfg.warmup_steps:
            lr *= (global_step + 1) / cfg.warmup_steps
        lr = max(lr, cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        return lr

    def epoch_end(self, epoch: int, metric: float | None, higher_is_better: bool = False) -> None:
        """Update after epoch ``epoch`` (1-based) with the validation metric (None: no eval)."""
        cfg = self.cfg
        if cfg.schedule == "step" and epoch >= cfg.decay_start:
            self.scale *= cfg.decay
        elif cfg.schedule == "plateau" and metric is not None and math.isfinite(metric):
            value = -metric if higher_is_better else metric
            if self.best is None or value < self.best:
                self.best = value
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > cfg.patience:
                    self.scale *= cfg.decay
                    self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.lr = float(state["lr"])
