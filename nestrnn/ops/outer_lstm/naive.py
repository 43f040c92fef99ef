"""Plain PyTorch reference for one direction of one layer of the outer LSTM around any memory
function: every step through autograd, nothing fused.

Also the path for what the fast implementation (``stepwise.py``) does not cover: a projection of
the output (``weight_hr``, nn.LSTM's ``proj_size``) and devices without it. ``outer_step`` is one
step, which ``NestedLSTMCell`` runs.

Shapes (T steps, B batch, I input size, H hidden size, P = proj_size or H, S = memory.num_states):

    x            (T, B, I)
    weights      LevelWeights: weight_ih (4H, I), weight_hh (4H, P), biases (4H,) or None
    weight_hr    (P, H) or None
    h0           (B, P)
    c0           (1 + S, B, H)   the outer cell, then the memory function's state
    batch_sizes  (T,) int64 CPU tensor of a packed batch sorted by length, or None
    returns      output (T, B, P), h_n (B, P), c_n (1 + S, B, H)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from nestrnn.ops.common.levels import LevelActivations, LevelNorms, LevelWeights, time_order
from nestrnn.ops.common.reference import level_step

if TYPE_CHECKING:
    from nestrnn.memory.base import MemoryFunction


def outer_step(
    projected_input: Tensor,
    h: Tensor,
    cells: tuple[Tensor, ...],
    weights: LevelWeights,
    memory: MemoryFunction,
    candidate_activation: str,
    weight_hr: Tensor | None = None,
    norms: LevelNorms | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of the outer LSTM around ``memory``: the reference level step
    (``ops/common/reference.py``) with the memory function as its cell update (and ``norms``,
    the outer level's layer normalisation, or None).

    Args:
        projected_input: ``W_ih x_t + b_ih``, (B, 4H).
        h: previous hidden state (B, P).
        cells: previous cells ``(c^0, *memory_state)``, each (B, H).
    Returns:
        ``(h_t, (c^0_t, *memory_state_t))``.
    """
    rest = tuple(cells[1:])

    def update(gated_cell: Tensor, gated_input: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return memory(gated_cell, gated_input, rest)

    # the gates and the cell activation are an LSTM's; the candidate's is the memory's choice
    activations = LevelActivations(candidate=candidate_activation)
    h_new, state = level_step(projected_input, h, cells[0], weights, activations, update, norms)
    if weight_hr is not None:
        h_new = F.linear(h_new, weight_hr)
    return h_new, state


def outer_lstm_naive(
    x: Tensor,
    weights: LevelWeights,
    memory: MemoryFunction,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    candidate_activation: str = "tanh",
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer, step by step (see the module docstring for shapes)."""
    steps, batch = x.shape[0], x.shape[1]
    projected = F.linear(x, weights.weight_ih, weights.bias_ih)
    h, cells = h0, tuple(c0.unbind(0))
    outputs: list[Tensor] = [h0.new_empty(0)] * steps
    for t in time_order(steps, reverse):
        active = batch if batch_sizes is None else int(batch_sizes[t])
        h_active, cells_active = active_rows(h, cells, active)
        h_new, cells_new = outer_step(
            projected[t, :active],
            h_active,
            cells_active,
            weights,
            memory,
            candidate_activation,
            weight_hr,
        )
        h, cells, outputs[t] = merge_rows(h, cells, h_new, cells_new)
    if steps == 0:
        return x.new_zeros(0, batch, h0.shape[1]), h0, c0
    return torch.stack(outputs), h, torch.stack(cells)


def active_rows(
    h: Tensor, cells: tuple[Tensor, ...], active: int
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The state of the first ``active`` rows: those that take a step of a packed batch sorted by
    length (the whole state when every row does)."""
    if active == h.shape[0]:
        return h, cells
    return h[:active], tuple(c[:active] for c in cells)


def merge_rows(
    h: Tensor, cells: tuple[Tensor, ...], h_new: Tensor, cells_new: tuple[Tensor, ...]
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """After a step that only the first rows took (as many as ``h_new`` has): the state of every
    row (the others' unchanged) and the step's output (zero in the others' rows)."""
    active, batch = h_new.shape[0], h.shape[0]
    if active == batch:
        return h_new, tuple(cells_new), h_new
    output = torch.cat([h_new, h_new.new_zeros(batch - active, h_new.shape[1])])
    h = torch.cat([h_new, h[active:]])
    cells = tuple(torch.cat([new, old[active:]]) for new, old in zip(cells_new, cells))
    return h, cells, output
