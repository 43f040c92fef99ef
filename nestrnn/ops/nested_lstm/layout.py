"""What every implementation of the nested-LSTM op shares: argument types, activations, the layout
of the tensors the forward saves for the backward, and small helpers on them.

Shapes (T steps, B batch rows, I input size, H hidden size, D memory levels; level 0 is the outer
LSTM). Gates are in ``nn.LSTM``'s order (i, f, g, o) along every 4H axis. See docs/design.md for
the equations and why the layout is what it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from nestrnn.ops.common.levels import operand_dtype, state_dtype


class Saved(NamedTuple):
    """What the forward keeps for the backward, the same for every implementation.

        gates      (D, T, B, 4H)     state dtype  activated gates i, f, g, o of every level and step
        cells      (D, T+1, B, H)    state dtype  cell of each level by slot: slot t holds the state
                                                  before step t in forward time order (a reverse
                                                  direction starts from slot T)
        act_cells  (D, T, B, H)      state dtype  cell activation of each new cell: tanh(c^0) gives h,
                                                  act_k(c^k) the new cell of level k-1
        inputs     (D-1, T, B, 2H)   operand dtype  ``[x~ | h~] = [i*g | f*c_prev]`` of level k, the
                                                  input of level k+1 (no level when D == 1)

    With layer normalisation (the op's ``norms``; the last dimension is 0 without, so a call without
    costs nothing more), for the backward of each normalisation:

        norm_gates (D, T, B, 4H)     state dtype  each gate block normalised, before its scale and
                                                  shift: ``(z_j - mean) / sigma``
        norm_cells (D, T, B, H)      state dtype  each new cell normalised likewise
        inv_std    (D, T, B, 5)      state dtype  ``1 / sigma`` of the gate blocks i, f, g, o and of
                                                  the cell

    (A level without normalisation among levels with it holds values the backward never reads.)
    ``act_cells`` then holds the cell activation of the normalised cell, and ``gates`` the gates
    activated from the normalised pre-activations.

        Rows that are inactive at a step of a packed batch hold their carried state in ``cells``, zero
        in ``inputs`` (they meet zero gradients in the weight GEMMs, so they must be finite) and, in
        ``gates`` and ``act_cells``, values the backward never reads (zero, or what a kernel computed
        for them; the same from one run to the next, as a custom op's outputs must be).
    """

    gates: Tensor
    cells: Tensor
    act_cells: Tensor
    inputs: Tensor
    norm_gates: Tensor
    norm_cells: Tensor
    inv_std: Tensor

    def normalised(self) -> bool:
        """Whether the forward normalised (the normalisation's fields hold something)."""
        return self.inv_std.shape[-1] > 0


def saved_shapes(
    steps: int,
    batch: int,
    hidden: int,
    depth: int,
    dtype: torch.dtype,
    device: torch.device,
    normalised: bool = False,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every field of :class:`Saved` (what the fake implementation returns);
    ``normalised``: with layer normalisation (else its fields are empty)."""
    state, operand = state_dtype(dtype), operand_dtype(dtype, device)
    on = int(normalised)
    return {
        "gates": ((depth, steps, batch, 4 * hidden), state),
        "cells": ((depth, steps + 1, batch, hidden), state),
        "act_cells": ((depth, steps, batch, hidden), state),
        "inputs": ((depth - 1, steps, batch, 2 * hidden), operand),
        "norm_gates": ((depth, steps, batch, 4 * hidden * on), state),
        "norm_cells": ((depth, steps, batch, hidden * on), state),
        "inv_std": ((depth, steps, batch, 5 * on), state),
    }


Allocate = Callable[[tuple[int, ...], torch.dtype, torch.device], Tensor]


def torch_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def empty_saved(
    steps: int,
    batch: int,
    hidden: int,
    depth: int,
    dtype: torch.dtype,
    device: torch.device,
    packed: bool,
    allocate: Allocate = torch_empty,
    normalised: bool = False,
) -> Saved:
    """Buffers for :class:`Saved` from ``allocate``, zeroed for packed batches (see there)."""
    fields = {}
    shapes = saved_shapes(steps, batch, hidden, depth, dtype, device, normalised)
    for name, (shape, dt) in shapes.items():
        fields[name] = allocate(shape, dt, device)
        if packed:
            fields[name].zero_()
    return Saved(**fields)


def state_slots(steps: int, reverse: bool) -> tuple[int, int]:
    """The slots of the initial and the final state in ``Saved.cells``."""
    return (steps, 0) if reverse else (0, steps)
