"""Named activation functions, so that per-level activations can be chosen in configs.

Modules store activation *names* and look the function up when they run: a pickled model then
holds only strings, and loads with ``torch.load(weights_only=True)``. Every activation here can
be differentiated from its output alone (``output_derivative``), which is what lets the fused
time loops save activated values only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def identity(x: Tensor) -> Tensor:
    return x


#: name -> function; the order is fixed: the native kernels know an activation by its index here
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "identity": identity,
    "relu": torch.relu,
    "hardtanh": F.hardtanh,
    "softsign": F.softsign,
}


def get_activation(name: str, argument: str = "activation") -> Callable[[Tensor], Tensor]:
    """Look up an activation by name; ``argument`` names the option in the error message."""
    check_activation(name, argument)
    return ACTIVATIONS[name]


def check_activation(name: object, argument: str = "activation") -> None:
    """Raise a clear ValueError unless ``name`` is a known activation."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{argument} must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def activation_code(name: str) -> int:
    """The index of an activation, as the native kernels know it."""
    return list(ACTIVATIONS).index(name)


def output_derivative(name: str, y: Tensor) -> Tensor:
    """d act(x) / dx written in terms of the output ``y = act(x)``."""
    if name == "sigmoid":
        return y * (1 - y)
    if name == "tanh":
        return 1 - y * y
    if name == "identity":
        return torch.ones_like(y)
    if name == "relu":
        return (y > 0).to(y.dtype)
    if name == "hardtanh":
        return ((y > -1) & (y < 1)).to(y.dtype)
    if name == "softsign":
        return (1 - y.abs()).square()
    raise ValueError(f"unknown activation {name!r}")
