"""Plain PyTorch reference for one direction of one Nested LSTM layer.

This is the reference every fast version of the op is tested against. It follows DESIGN.md section 1
line by line, uses autograd for the backward pass, and makes no attempt to be fast.

Shapes (T = steps, B = batch, I = input size, H = hidden size, D = memory levels):

    x            (T, B, I)
    weights      D tuples (weight_ih, weight_hh, bias_ih, bias_hh); level 0 is the outer LSTM
                 (weight_ih (4H, I)), levels 1..D-1 are nested (weight_ih (4H, H)); every
                 weight_hh is (4H, H); biases are (4H,) or None
    h0           (B, H)
    c0           (D, B, H)      c0[k] is the cell of level k
    batch_sizes  (T,) int64 CPU tensor, non-increasing, or None: at step t only rows
                 b < batch_sizes[t] are active (a packed batch sorted by length); inactive
                 rows keep their state and get zero output
    returns      output (T, B, H), h_n (B, H), c_n (D, B, H)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nestrnn.ops.nested_lstm.common import LevelWeights, time_order


def nested_cell_step(
    x_t: Tensor, h: Tensor, cells: list[Tensor], weights: list[LevelWeights]
) -> tuple[Tensor, list[Tensor]]:
    """One step of the full nested cell. ``x_t`` (B, I), ``h`` (B, H), ``cells`` D x (B, H)."""
    depth = len(weights)
    w_ih, w_hh, b_ih, b_hh = weights[0]
    i, f, g, o = (F.linear(x_t, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=1)
    i, f, o = i.sigmoid(), f.sigmoid(), o.sigmoid()
    g = g.tanh() if depth == 1 else g  # identity candidate when nested
    gated_input, gated_cells, out_gates = [i * g], [f * cells[0]], [o]
    for k in range(1, depth):
        w_ih, w_hh, b_ih, b_hh = weights[k]
        gates = F.linear(gated_input[-1], w_ih, b_ih) + F.linear(gated_cells[-1], w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        gated_input.append(i * g)
        gated_cells.append(f * cells[k])
        out_gates.append(o)
    new_cells = [gated_cells[-1] + gated_input[-1]]  # innermost level adds
    for k in range(depth - 1, 0, -1):  # ascent: c^{k-1} = o_k * tanh(c^k)
        new_cells.insert(0, out_gates[k] * new_cells[0].tanh())
    return out_gates[0] * new_cells[0].tanh(), new_cells


def nested_lstm_naive(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer step by step (see the module docstring)."""
    steps, batch = x.shape[0], x.shape[1]
    h, cells = h0, list(c0.unbind(0))
    outputs: list[Tensor | None] = [None] * steps
    for t in time_order(steps, reverse):
        h_new, cells_new = nested_cell_step(x[t], h, cells, weights)
        active = None if batch_sizes is None else int(batch_sizes[t])
        if active is None or active == batch:
            h, cells = h_new, cells_new
            outputs[t] = h
        else:
            keep = (torch.arange(batch, device=x.device) < active).unsqueeze(1)
            h = torch.where(keep, h_new, h)
            cells = [torch.where(keep, new, old) for new, old in zip(cells_new, cells)]
            outputs[t] = torch.where(keep, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, torch.stack(cells)
