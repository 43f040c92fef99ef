"""Plain PyTorch reference for one direction of one Nested LSTM layer.

Every implementation of the op is tested against this. Each step is the reference cell
(``ops/common/reference.py``: ``nested_cell_step``) under autograd; this adds the time loop and
the rows of a packed batch, and makes no attempt to be fast.

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
    zoneout      (D + 1, T, B, H) keep weights in [0, 1] or None: zoneout[k, t] mixes the cell of
                 level k carried past step t with its previous value, zoneout[D, t] h
                 (``reference.nested_cell_step``); any floating dtype, read in the state's
    norms        D ``LevelNorms`` or None per level (None: no layer normalisation at that level),
                 or None for none at all (``reference.level_step``)
    returns      output (T, B, H), h_n (B, H), c_n (D, B, H)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from nestrnn.ops.common.levels import (
    LevelActivations,
    LevelNorms,
    LevelWeights,
    standard_activations,
    time_order,
)
from nestrnn.ops.common.reference import nested_cell_step


def nested_lstm_naive(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    activations: tuple[LevelActivations, ...] | None = None,
    weight_hr: Tensor | None = None,
    zoneout: Tensor | None = None,
    norms: Sequence[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer step by step (see the module docstring). With
    ``weight_hr`` (P, H), nn.LSTM's projection: ``h_t = W_hr (o_t * act(c_t))`` is P wide, and so
    are h0, the output and level 0's weight_hh (4H, P)."""
    steps, batch = x.shape[0], x.shape[1]
    activations = activations or standard_activations(len(weights))
    h, cells = h0, list(c0.unbind(0))
    outputs: list[Tensor | None] = [None] * steps
    for t in time_order(steps, reverse):
        z_t = None if zoneout is None else zoneout[:, t].to(h.dtype).unbind(0)
        h_new, cells_new = nested_cell_step(
            x[t], h, cells, weights, activations, weight_hr, z_t, norms
        )
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
