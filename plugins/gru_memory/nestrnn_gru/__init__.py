"""A GRU-style memory function for nestrnn, registered through the ``nestrnn`` entry point."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nestrnn
from nestrnn.memory import MemoryFunction, State

__all__ = ["GRUMemory", "register_memories"]


class GRUMemory(MemoryFunction):
    """``c_t = GRUCell(input=i*g, hidden=f*c_{t-1})``; parameters named like ``nn.GRUCell``.

    weight_ih (3H, H), weight_hh (3H, H), bias_ih and bias_hh (3H,), gate order r, z, n.
    """

    num_states = 0
    outer_candidate_activation = "tanh"

    def __init__(self, hidden_size: int, bias: bool = True) -> None:
        super().__init__(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters(recurse=False):
            nn.init.uniform_(parameter, -bound, bound)

    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        r_i, z_i, n_i = F.linear(gated_input, self.weight_ih, self.bias_ih).chunk(3, dim=1)
        r_h, z_h, n_h = F.linear(gated_cell, self.weight_hh, self.bias_hh).chunk(3, dim=1)
        r = torch.sigmoid(r_i + r_h)
        z = torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * gated_cell, ()


@nestrnn.hookimpl
def register_memories(register: Callable[..., None]) -> None:
    register("gru", GRUMemory, "a GRU cell computes the new cell from i*g and f*c")
