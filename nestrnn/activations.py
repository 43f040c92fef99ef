"""Named activation functions, so that per-level activations can be chosen in configs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": identity,
    "relu": torch.relu,
    "hardtanh": torch.nn.functional.hardtanh,
    "softsign": torch.nn.functional.softsign,
}


def get_activation(name: str, argument: str = "activation") -> Callable[[Tensor], Tensor]:
    """Look up an activation by name; ``argument`` names the option in the error message."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{argument} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
