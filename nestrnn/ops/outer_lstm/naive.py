"""The generic per-step path: the outer LSTM step with any memory function.

Used by :class:`NestedLSTMCell` and by :class:`NestedLSTM` for memory functions that are not a
standard additive/nested chain (those run through the fused op instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nestrnn.memory.base import MemoryFunction
from nestrnn.ops.nested_lstm.common import time_order


def outer_step(
    projected_input: Tensor,
    h: Tensor,
    cells: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    memory: MemoryFunction,
    candidate_activation: Callable[[Tensor], Tensor],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of the outer LSTM around ``memory``.

    Args:
        projected_input: ``W_ih x_t + b_ih``, (B, 4H).
        h: previous hidden state (B, H).
        cells: previous cells ``(c^0, *memory_state)``, each (B, H).
    Returns:
        ``(h_t, (c^0_t, *memory_state_t))``.
    """
    gates = projected_input + F.linear(h, weight_hh, bias_hh)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, o = i.sigmoid(), f.sigmoid(), o.sigmoid()
    cell, state = memory(f * cells[0], i * candidate_activation(g), tuple(cells[1:]))
    return o * cell.tanh(), (cell, *state)


def run_generic(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    memory: MemoryFunction,
    candidate_activation: Callable[[Tensor], Tensor],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer, step by step. Same contract as ``ops.nested_lstm.nested_lstm``:
    x (T, B, I), h0 (B, H), c0 (1 + memory.num_states, B, H) -> output (T, B, H), h_n, c_n.
    """
    steps, batch = x.shape[0], x.shape[1]
    projected = F.linear(x, weight_ih, bias_ih)
    h, cells = h0, tuple(c0.unbind(0))
    outputs: list[Tensor | None] = [None] * steps
    for t in time_order(steps, reverse):
        active = batch if batch_sizes is None else int(batch_sizes[t])
        if active == batch:
            h, cells = outer_step(
                projected[t], h, cells, weight_hh, bias_hh, memory, candidate_activation
            )
            outputs[t] = h
            continue
        # packed batch sorted by length: only the first `active` rows take a step
        h_new, cells_new = outer_step(
            projected[t, :active],
            h[:active],
            tuple(c[:active] for c in cells),
            weight_hh,
            bias_hh,
            memory,
            candidate_activation,
        )
        h = torch.cat([h_new, h[active:]])
        cells = tuple(torch.cat([new, old[active:]]) for new, old in zip(cells_new, cells))
        outputs[t] = torch.cat([h_new, h_new.new_zeros(batch - active, h_new.shape[1])])
    return torch.stack(outputs), h, torch.stack(cells)
