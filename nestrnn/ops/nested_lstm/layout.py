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

LOW_PRECISION = (torch.float16, torch.bfloat16)


class LevelWeights(NamedTuple):
    """The four parameters of one LSTM level, named as in ``torch.nn.LSTMCell``.

    weight_ih (4H, I or H), weight_hh (4H, H), bias_ih and bias_hh (4H,) or None.
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None

    def combined_bias(self) -> Tensor | None:
        """b_ih + b_hh (4H,) as the gates add it, or None without biases."""
        present = [b for b in (self.bias_ih, self.bias_hh) if b is not None]
        return None if not present else present[0] if len(present) == 1 else present[0] + present[1]


class LevelActivations(NamedTuple):
    """The activations of one level: ``gate`` for i, f and o, ``candidate`` for g, and ``cell``
    for the level's output ``o * cell(c)`` (h at level 0, the cell of level k-1 below that)."""

    gate: str = "sigmoid"
    candidate: str = "tanh"
    cell: str = "tanh"


def standard_activations(depth: int) -> tuple[LevelActivations, ...]:
    """The paper's activations: every level is an LSTM's, except that the outer candidate is the
    identity when nested."""
    outer = LevelActivations(candidate="tanh" if depth == 1 else "identity")
    return (outer,) + (LevelActivations(),) * (depth - 1)


def encode_activations(levels: tuple[LevelActivations, ...] | list[LevelActivations]) -> str:
    """``"sigmoid,identity,tanh;sigmoid,tanh,tanh"``: one ``gate,candidate,cell`` group a level.
    This string is the op's ``activations`` argument (custom ops take no list of strings); the
    names are checked by ``checks.check_inputs``."""
    return ";".join(",".join(level) for level in levels)


def decode_activations(text: str) -> tuple[LevelActivations, ...]:
    """Inverse of :func:`encode_activations`."""
    return tuple(LevelActivations(*group.split(",")) for group in text.split(";"))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device``, or None where it is off. A device
    with no autocast at all (meta, for shape-only runs) has it off: asking torch would raise."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gates, cells and every carried state are float32 for half-precision inputs."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def operand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the saved level inputs ``[x~ | h~]``: GEMM operands. On CUDA they stay in the
    input dtype (half-precision tensor-core GEMMs); on CPU every GEMM runs in the state dtype."""
    return dtype if device.type == "cuda" else state_dtype(dtype)


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


def time_order(steps: int, reverse: bool) -> range:
    """Step indices in processing order."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def state_slots(steps: int, reverse: bool) -> tuple[int, int]:
    """The slots of the initial and the final state in ``Saved.cells``."""
    return (steps, 0) if reverse else (0, steps)
