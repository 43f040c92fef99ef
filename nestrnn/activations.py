"""Named activation functions, so that per-level activations can be chosen in configs.

Modules store activation *names* and look the function up when they run: a pickled model then
holds only strings, and loads with ``torch.load(weights_only=True)``. Every activation here can
be differentiated from its output alone (``output_derivative``), which is what lets the fused
time loops save activated values only.

``ACTIVATION_TABLE`` is the one table of them: name, code, function and derivative. The native
kernels and the Triton kernels know an activation by its code (nlstm_kernel.h's enum
``nlstm_activation`` has the same codes); tests/test_activations.py checks every implementation
of every activation against this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class Activation:
    """One activation: its ``code`` in the native and Triton kernels, ``function``, and
    ``derivative``, d function(x) / dx written in terms of the output ``y = function(x)``."""

    code: int
    function: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]


#: name -> Activation, codes 0, 1, ... in this order
ACTIVATION_TABLE: dict[str, Activation] = {
    "sigmoid": Activation(0, torch.sigmoid, lambda y: y * (1 - y)),
    "tanh": Activation(1, torch.tanh, lambda y: 1 - y * y),
    "identity": Activation(2, identity, torch.ones_like),
    "relu": Activation(3, torch.relu, lambda y: (y > 0).to(y.dtype)),
    "hardtanh": Activation(4, F.hardtanh, lambda y: ((y > -1) & (y < 1)).to(y.dtype)),
    "softsign": Activation(5, F.softsign, lambda y: (1 - y.abs()).square()),
}

#: name -> function
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    name: activation.function for name, activation in ACTIVATION_TABLE.items()
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
    """The code of an activation, as the native and Triton kernels know it."""
    check_activation(name)
    return ACTIVATION_TABLE[name].code


def output_derivative(name: str, y: Tensor) -> Tensor:
    """d act(x) / dx written in terms of the output ``y = act(x)``."""
    if name not in ACTIVATION_TABLE:
        raise ValueError(f"unknown activation {name!r}")
    return ACTIVATION_TABLE[name].derivative(y)
