"""Memory functions of a user's own that the tests share."""

from __future__ import annotations

import torch
from torch import nn

from nestrnn import MemoryFunction


class Leaky(MemoryFunction):
    """README's example memory function, with a random learned rate (it runs the generic path)."""

    outer_candidate_activation = "tanh"

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.logit = nn.Parameter(torch.randn(hidden_size))

    def forward(self, gated_cell, gated_input, state):
        a = torch.sigmoid(self.logit)
        return a * gated_cell + (1 - a) * torch.tanh(gated_input), ()
