"""Input and state validation shared by NestedLSTM and NestedLSTMCell.

Everything here runs before any computation, so bad input gets a one-line error that names the
argument and what was expected, not a stack trace from inside a kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def memory_spec_for_depth(depth: int | None) -> Any:
    """The memory spec for ``depth`` memory levels (default 2): additive at 1, nested above."""
    depth = 2 if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    return "additive" if depth == 1 else {"name": "nested", "depth": depth}


def _check_like(tensor: Tensor, name: str, like: Tensor) -> None:
    if tensor.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but the module's parameters are {like.dtype}; "
            "convert one of them (e.g. module.to(dtype) or tensor.to(dtype))"
        )
    if tensor.device != like.device:
        raise ValueError(
            f"{name} is on {tensor.device} but the module's parameters are on {like.device}; "
            "move one of them (module.to(device) or tensor.to(device))"
        )


def check_input(
    input: Any, dims: int | tuple[int, ...], input_size: int, like: Tensor, packed: bool = False
) -> None:
    """Check rank, feature size, dtype and device of the input (or of a PackedSequence's data)."""
    name = "PackedSequence data" if packed else "input"
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
    dims = (dims,) if isinstance(dims, int) else dims
    if input.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"expected {name} to be {expected}, got {input.dim()}-D")
    if input.shape[-1] != input_size:
        raise ValueError(
            f"{name}.size(-1) must be equal to input_size. Expected {input_size}, "
            f"got {input.shape[-1]}"
        )
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {input.dtype}")
    _check_like(input, name, like)


def prepare_state(
    hx: Any,
    batched: bool,
    prefix: tuple[int, ...],
    batch: int,
    hidden_size: int,
    num_cells: int,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Validate ``hx = (h_0, c_0)`` (or None) and return it in the batched internal layout.

    ``prefix`` is (num_layers * num_directions,) for a layer and () for a cell. Returns
    h_0 of shape (*prefix, B, H) and c_0 of shape (num_cells, *prefix, B, H).
    The user-facing c_0 has no leading ``num_cells`` axis when ``num_cells == 1`` (as nn.LSTM).
    """
    rows = (batch,) if batched else ()
    h_shape = (*prefix, *rows, hidden_size)
    c_shape = h_shape if num_cells == 1 else (num_cells, *h_shape)
    if hx is None:
        h0 = torch.zeros(*prefix, batch, hidden_size, dtype=like.dtype, device=like.device)
        return h0, torch.zeros(num_cells, *h0.shape, dtype=like.dtype, device=like.device)
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(
            "hx must be a tuple (h_0, c_0) of two tensors, "
            f"got {type(hx).__name__}{f' of length {len(hx)}' if isinstance(hx, (tuple, list)) else ''}"
        )
    h0, c0 = hx
    for tensor, name, shape in ((h0, "h_0", h_shape), (c0, "c_0", c_shape)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            hint = ""
            if name == "c_0" and num_cells > 1:
                hint = f" (one cell per memory level: depth {num_cells} first)"
            raise ValueError(f"expected {name} of shape {shape}{hint}, got {tuple(tensor.shape)}")
        _check_like(tensor, name, like)
    if num_cells == 1:
        c0 = c0.unsqueeze(0)
    if not batched:
        h0, c0 = h0.unsqueeze(-2), c0.unsqueeze(-2)
    return h0, c0
