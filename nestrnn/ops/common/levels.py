"""Types and helpers every recurrent op shares: one LSTM level's weights and activations, the
dtypes a computation runs in, and the order of time steps.

Shapes: H hidden size, I input size; gates are in ``nn.LSTM``'s order (i, f, g, o) along every 4H
axis.
"""

from __future__ import annotations

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


#: epsilon of every layer normalisation inside the cell, as ``torch.nn.functional.layer_norm``'s
LAYER_NORM_EPS = 1e-5


class LevelNorms(NamedTuple):
    """The layer-normalisation parameters of one level (docs/design.md): ``gates_weight`` and
    ``gates_bias`` (4H,) scale and shift each normalised gate block i, f, g, o (each normalised
    over its own H units); ``cell_weight`` and ``cell_bias`` (H,) the normalised new cell before
    the level's cell activation. A level without layer normalisation has None for its norms."""

    gates_weight: Tensor
    gates_bias: Tensor
    cell_weight: Tensor
    cell_bias: Tensor


def normalise_gates(z: Tensor, norms: LevelNorms) -> Tensor:
    """Layer normalisation of each of the four H-wide gate blocks of ``z`` (B, 4H)."""
    blocks = z.unflatten(-1, (4, -1))
    mean = blocks.mean(-1, keepdim=True)
    var = blocks.var(-1, unbiased=False, keepdim=True)
    normed = ((blocks - mean) * torch.rsqrt(var + LAYER_NORM_EPS)).flatten(-2)
    return normed * norms.gates_weight + norms.gates_bias


def normalise_cell(c: Tensor, norms: LevelNorms) -> Tensor:
    """Layer normalisation of a new cell (B, H) before the level's cell activation."""
    mean = c.mean(-1, keepdim=True)
    var = c.var(-1, unbiased=False, keepdim=True)
    return (c - mean) * torch.rsqrt(var + LAYER_NORM_EPS) * norms.cell_weight + norms.cell_bias


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


def time_order(steps: int, reverse: bool) -> range:
    """Step indices in processing order."""
    return range(steps - 1, -1, -1) if reverse else range(steps)
