"""The parameters of an LSTM level, created and initialised in one place for the outer layer, the
cell and the nested memory levels.

Defaults follow the paper's published reimplementations: orthogonal recurrent weights (each of the
four gate blocks of ``weight_hh`` is an orthogonal H x H matrix) and a forget-gate bias of 1.0.
``recurrent_init="uniform"`` and ``forget_bias=None`` give PyTorch's nn.LSTM initialisation instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

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
