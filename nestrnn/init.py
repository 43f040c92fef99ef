"""The parameters of an LSTM level, created and initialised in one place for the outer layer, the
cell and the nested memory levels.

Defaults follow the paper's published reimplementations: orthogonal recurrent weights (each of the
four gate blocks of ``weight_hh`` is an orthogonal H x H matrix) and a forget-gate bias of 1.0.
``recurrent_init="uniform"`` and ``forget_bias=None`` give PyTorch's nn.LSTM initialisation instead.
A level's layer normalisation (``layer_norm``) starts as the identity: scales 1, shifts 0, except
the forget gates' shift, which takes the forget bias.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nestrnn.arguments import check_bool
from nestrnn.ops.common.levels import LevelNorms

RECURRENT_INITS = ("orthogonal", "uniform")


def add_lstm_parameters(
    module: nn.Module,
    suffix: str,
    input_size: int,
    hidden_size: int,
    bias: bool,
    proj_size: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Register one LSTM level's parameters on ``module``, named like ``nn.LSTM``'s:
    ``weight_ih{suffix}`` (4H, I), ``weight_hh{suffix}`` (4H, P), ``bias_ih{suffix}`` and
    ``bias_hh{suffix}`` (4H,) or None, and with ``proj_size`` P > 0 ``weight_hr{suffix}`` (P, H).
    Values are left uninitialised (``init_lstm_level``)."""
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    recurrent = proj_size or hidden_size
    module.register_parameter(
        f"weight_ih{suffix}", nn.Parameter(torch.empty(4 * hidden_size, input_size, **kwargs))
    )
    module.register_parameter(
        f"weight_hh{suffix}", nn.Parameter(torch.empty(4 * hidden_size, recurrent, **kwargs))
    )
    for kind in ("ih", "hh"):
        value = nn.Parameter(torch.empty(4 * hidden_size, **kwargs)) if bias else None
        module.register_parameter(f"bias_{kind}{suffix}", value)
    if proj_size > 0:
        module.register_parameter(
            f"weight_hr{suffix}", nn.Parameter(torch.empty(proj_size, hidden_size, **kwargs))
        )


def check_init_options(forget_bias: float | None, recurrent_init: str) -> None:
    """Raise a clear error for invalid initialisation options."""
    if recurrent_init not in RECURRENT_INITS:
        raise ValueError(f"recurrent_init must be one of {RECURRENT_INITS}, got {recurrent_init!r}")
    if forget_bias is not None and (
        isinstance(forget_bias, bool)
        or not isinstance(forget_bias, (int, float))
        or not math.isfinite(forget_bias)
    ):
        raise TypeError(f"forget_bias must be a finite number or None, got {forget_bias!r}")


@torch.no_grad()
def init_lstm_level(
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    forget_bias: float | None = 1.0,
    recurrent_init: str = "orthogonal",
    weight_hr: Tensor | None = None,
) -> None:
    """Initialise one LSTM level in place (gate order i, f, g, o along dim 0).

    weight_ih (4H, I), weight_hh (4H, P), biases (4H,) or None, weight_hr (P, H) or None.
    """
    hidden_size = weight_ih.shape[0] // 4
    bound = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for tensor in (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr):
        if tensor is not None:
            nn.init.uniform_(tensor, -bound, bound)
    if recurrent_init == "orthogonal":
        for block in weight_hh.chunk(4, dim=0):
            nn.init.orthogonal_(block)
    if forget_bias is not None:
        forget = slice(hidden_size, 2 * hidden_size)
        for bias in (bias_ih, bias_hh):
            if bias is not None:
                bias.zero_()
        if bias_ih is not None:
            bias_ih[forget] = forget_bias
        elif bias_hh is not None:
            bias_hh[forget] = forget_bias


#: the names of one level's layer-normalisation parameters (``LevelNorms``'s fields), each
#: followed by the level's suffix on a layer (``layer_norm_gates_weight_l0``)
LAYER_NORM_NAMES = tuple(f"layer_norm_{field}" for field in LevelNorms._fields)


def layer_norm_flags(value: Any, depth: int) -> tuple[bool, ...]:
    """One flag per memory level (level 0 is the outer LSTM) from a bool (every level) or a
    sequence of ``depth`` bools."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != depth:
            raise ValueError(
                f"layer_norm needs one bool per memory level ({depth}), got {len(value)}: "
                f"{list(value)!r}; give one bool for every level"
            )
        for k, flag in enumerate(value):
            check_bool(flag, f"layer_norm[{k}]")
        return tuple(value)
    check_bool(value, "layer_norm")
    return (value,) * depth


def split_layer_norm(layer_norm: Any) -> tuple[bool, bool | tuple[bool, ...]]:
    """For a layer or a cell: the outer level's flag, and what the nested levels of its memory
    are given: its bool, or its flags for the levels below the outer one (False where none is
    on). Checked once the depth is known (``layer_norm_flags``)."""
    if isinstance(layer_norm, Sequence) and not isinstance(layer_norm, str):
        flags = tuple(layer_norm)
        rest = flags[1:]
        return bool(flags and flags[0] is True), rest if any(rest) else False
    return layer_norm is True, layer_norm is True


def add_layer_norm_parameters(
    module: nn.Module,
    suffix: str,
    hidden_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Register one level's layer-normalisation parameters on ``module``: ``layer_norm_gates_weight
    {suffix}`` and ``layer_norm_gates_bias{suffix}`` (4H,), ``layer_norm_cell_weight{suffix}`` and
    ``layer_norm_cell_bias{suffix}`` (H,). Values are left uninitialised (``init_layer_norm``)."""
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    for name, size in zip(LAYER_NORM_NAMES, (4, 4, 1, 1)):
        parameter = nn.Parameter(torch.empty(size * hidden_size, **kwargs))
        module.register_parameter(f"{name}{suffix}", parameter)


def layer_norm_parameters(module: nn.Module, suffix: str) -> LevelNorms | None:
    """The parameters ``add_layer_norm_parameters`` registered, or None where it did not."""
    if not hasattr(module, f"{LAYER_NORM_NAMES[0]}{suffix}"):
        return None
    return LevelNorms(*(getattr(module, f"{name}{suffix}") for name in LAYER_NORM_NAMES))


@torch.no_grad()
def init_layer_norm(norms: LevelNorms, forget_bias: float | None = 1.0) -> None:
    """Scales 1, shifts 0, except the forget block's gate shift: ``forget_bias`` where that is
    not None (the normalisation removes a constant bias added before it)."""
    for weight in (norms.gates_weight, norms.cell_weight):
        weight.fill_(1.0)
    for bias in (norms.gates_bias, norms.cell_bias):
        bias.zero_()
    if forget_bias is not None:
        hidden_size = norms.cell_weight.shape[0]
        norms.gates_bias[hidden_size : 2 * hidden_size] = forget_bias
