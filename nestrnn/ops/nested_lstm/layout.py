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

    Rows that are inactive at a step of a packed batch hold their carried state in ``cells``, zero
    in ``inputs`` (they meet zero gradients in the weight GEMMs, so they must be finite) and, in
    ``gates`` and ``act_cells``, values the backward never reads (zero, or what a kernel computed
    for them; the same from one run to the next, as a custom op's outputs must be).
    """

    gates: Tensor
    cells: Tensor
    act_cells: Tensor
    inputs: Tensor


def saved_shapes(
    steps: int, batch: int, hidden: int, depth: int, dtype: torch.dtype, device: torch.device
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every field of :class:`Saved` (what the fake implementation returns)."""
    state, operand = state_dtype(dtype), operand_dtype(dtype, device)
    return {
        "gates": ((depth, steps, batch, 4 * hidden), state),
        "cells": ((depth, steps + 1, batch, hidden), state),
        "act_cells": ((depth, steps, batch, hidden), state),
        "inputs": ((depth - 1, steps, batch, 2 * hidden), operand),
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
) -> Saved:
    """Buffers for :class:`Saved` from ``allocate``, zeroed for packed batches (see there)."""
    fields = {}
    for name, (shape, dt) in saved_shapes(steps, batch, hidden, depth, dtype, device).items():
        fields[name] = allocate(shape, dt, device)
        if packed:
            fields[name].zero_()
    return Saved(**fields)


def state_slots(steps: int, reverse: bool) -> tuple[int, int]:
    """The slots of the initial and the final state in ``Saved.cells``."""
    return (steps, 0) if reverse else (0, steps)
