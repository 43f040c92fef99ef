"""Plain PyTorch reference for one direction of one Nested LSTM layer.

Every implementation of the op is tested against this. It follows the equations of
docs/design.md line by line, uses autograd for the backward pass, and makes no attempt to be fast.

Shapes (T = steps, B = batch, I = input size, H = hidden size, D = memory levels):

    x            (T, B, I)
    weights      D ``LevelWeights`` (weight_ih, weight_hh, bias_ih, bias_hh); level 0 is the outer
                 LSTM (weight_ih (4H, I)), levels 1..D-1 are nested (weight_ih (4H, H)); every
                 weight_hh is (4H, H); biases are (4H,) or None
    h0           (B, H)
    c0           (D, B, H)      c0[k] is the cell of level k
    batch_sizes  (T,) int64 CPU tensor, non-increasing, or None: at step t only rows
                 b < batch_sizes[t] are active (a packed batch sorted by length); inactive
                 rows keep their state and get zero output
    activations  D ``LevelActivations`` (None: the paper's, ``layout.standard_activations``)
    returns      output (T, B, H), h_n (B, H), c_n (D, B, H)
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from nestrnn.activations import ACTIVATIONS
from nestrnn.ops.common.levels import (
    LevelActivations,
    LevelWeights,
    standard_activations,
    time_order,
)


def nested_cell_step(
    x_t: Tensor,
    h: Tensor,
    cells: list[Tensor],
    weights: list[LevelWeights],
    activations: tuple[LevelActivations, ...],
) -> tuple[Tensor, list[Tensor]]:
    """One step of the full nested cell. ``x_t`` (B, I), ``h`` (B, H), ``cells`` D x (B, H)."""
    depth = len(weights)
    level_input, level_hidden = x_t, h  # level 0: x_t and h; level k: x~ and h~ of level k-1
    gated_inputs, gated_cells, out_gates = [], [], []
    for k in range(depth):
        w_ih, w_hh, b_ih, b_hh = weights[k]
        act = activations[k]
        gate, candidate = ACTIVATIONS[act.gate], ACTIVATIONS[act.candidate]
        gates = F.linear(level_input, w_ih, b_ih) + F.linear(level_hidden, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = gate(i), gate(f), candidate(g), gate(o)
        gated_inputs.append(i * g)
        gated_cells.append(f * cells[k])
        out_gates.append(o)
        level_input, level_hidden = gated_inputs[-1], gated_cells[-1]
    new_cells = [gated_cells[-1] + gated_inputs[-1]]  # the innermost level adds
    for k in range(depth - 1, 0, -1):  # ascent: c^{k-1} = o_k * act_k(c^k)
        new_cells.insert(0, out_gates[k] * ACTIVATIONS[activations[k].cell](new_cells[0]))
    return out_gates[0] * ACTIVATIONS[activations[0].cell](new_cells[0]), new_cells


def nested_lstm_naive(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    activations: tuple[LevelActivations, ...] | None = None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer step by step (see the module docstring). With
    ``weight_hr`` (P, H), nn.LSTM's projection: ``h_t = W_hr (o_t * act(c_t))`` is P wide, and so
    are h0, the output and level 0's weight_hh (4H, P)."""
    steps, batch = x.shape[0], x.shape[1]
    activations = activations or standard_activations(len(weights))
    h, cells = h0, list(c0.unbind(0))
    outputs: list[Tensor | None] = [None] * steps
    for t in time_order(steps, reverse):
        h_new, cells_new = nested_cell_step(x[t], h, cells, weights, activations)
        if weight_hr is not None:
            h_new = F.linear(h_new, weight_hr)
        active = None if batch_sizes is None else int(batch_sizes[t])
        if active is None or active == batch:
            h, cells = h_new, cells_new
            outputs[t] = h
        else:
            keep = (torch.arange(batch, device=x.device) < active).unsqueeze(1)
            h = torch.where(keep, h_new, h)
            cells = [torch.where(keep, new, old) for new, old in zip(cells_new, cells)]
            outputs[t] = torch.where(keep, h_new, torch.zeros_like(h_new))
    if steps == 0:
        return x.new_zeros(0, batch, h0.shape[1]), h0, c0
    return torch.stack(cast(list[Tensor], outputs)), h, torch.stack(cells)
