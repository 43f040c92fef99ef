"""Input and state validation, and the default state, shared by NestedLSTM and NestedLSTMCell.

Everything here runs before any computation, so bad input gets a one-line error that names the
argument and what was expected, not a stack trace from inside a kernel. The exception types are
``torch.nn.LSTM``'s and ``torch.nn.LSTMCell``'s for the same mistakes: ValueError for the input's
rank and dtype (and for the rank of a cell's state), RuntimeError for its feature size, its device
and anything else wrong with the state (its shapes, a tuple of other than two tensors); TypeError
for an argument that is not a tensor (or a state that is not a tuple) at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nestrnn.arguments import check_int
from nestrnn.ops.common.levels import autocast_dtype

if TYPE_CHECKING:
    from nestrnn.memory.base import MemoryFunction


def memory_spec_for_depth(depth: int | None) -> Any:
    """The memory spec for ``depth`` memory levels (default 2): additive at 1, nested above."""
    depth = 2 if depth is None else depth
    check_int(depth, "depth")
    return "additive" if depth == 1 else {"name": "nested", "depth": depth}


def initial_cells(
    memory: MemoryFunction, batch: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The cells of one direction when no state is given, (1 + S, B, H): a zero outer cell, then
    the memory function's ``init_state`` (checked: it is a plugin's code)."""
    state = tuple(memory.init_state(batch, dtype, device))
    expected = (batch, hidden)
    if len(state) != memory.num_states or any(s.shape != expected for s in state):
        raise RuntimeError(
            f"{type(memory).__name__}.init_state must return num_states="
            f"{memory.num_states} tensors of shape {expected}"
        )
    return torch.stack([torch.zeros(expected, dtype=dtype, device=device), *state])


def check_input(
    input: Any, dims: tuple[int, ...], input_size: int, like: Tensor, name: str = "input"
) -> None:
    """Check rank, feature size, dtype and device of the input (or of a PackedSequence's data)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"expected {name} to be {expected}, got {input.dim()}-D")
    if input.shape[-1] != input_size:
        raise RuntimeError(
            f"{name}.size(-1) must be equal to input_size. Expected {input_size}, "
            f"got {input.shape[-1]}"
        )
    if input.dtype != like.dtype and not (
        input.is_floating_point() and autocast_dtype(input.device) is not None
    ):
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({like.dtype}). "
            f"Convert input: input.to({like.dtype}), or convert model: model.to({input.dtype})"
        )
    _check_device(input, name, like)


def _check_device(tensor: Tensor, name: str, like: Tensor) -> None:
    if tensor.device != like.device:
        raise RuntimeError(
            f"{name} is on {tensor.device} but the module's parameters are on {like.device}; "
            "move one of them (module.to(device) or tensor.to(device))"
        )


def check_state(
    hx: Any,
    batched: bool,
    prefix: tuple[int, ...],
    batch: int,
    h_size: int,
    c_size: int,
    num_cells: int,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """Validate a given ``hx = (h_0, c_0)`` and return it in the batched internal layout.

    ``prefix`` is (num_layers * num_directions,) for a layer and () for a cell; ``h_size`` is the
    width of h (proj_size or hidden_size), ``c_size`` that of every cell. Returns h_0 of shape
    (*prefix, B, h_size) and c_0 of shape (num_cells, *prefix, B, c_size). The user-facing c_0 has
    no leading ``num_cells`` axis when ``num_cells == 1`` (as nn.LSTM).
    """
    rows = (batch,) if batched else ()
    h_shape = (*prefix, *rows, h_size)
    c_shape = (*prefix, *rows, c_size)
    if num_cells > 1:
        c_shape = (num_cells, *c_shape)
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError(
            f"hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__} of length "
            f"{len(hx)}"
        )
    h0, c0 = hx
    for tensor, name, shape in ((h0, "h_0", h_shape), (c0, "c_0", c_shape)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        unbatched = len(shape) - len(rows)
        if not prefix and tensor.dim() not in (unbatched, unbatched + 1):
            # a cell's state of the wrong rank, which nn.LSTMCell reports as a ValueError
            raise ValueError(
                f"expected {name} to be {unbatched}-D or {unbatched + 1}-D, got {tensor.dim()}-D"
            )
        if tuple(tensor.shape) != shape:
            hint = ""
            if name == "c_0" and num_cells > 1:
                hint = f" (one cell per memory level: depth {num_cells} first)"
            raise RuntimeError(f"expected {name} of shape {shape}{hint}, got {tuple(tensor.shape)}")
        if tensor.dtype != like.dtype and autocast_dtype(tensor.device) is None:
            raise RuntimeError(
                f"{name} has dtype {tensor.dtype} but the module's parameters are {like.dtype}; "
                "convert one of them (e.g. module.to(dtype) or tensor.to(dtype))"
            )
        _check_device(tensor, name, like)
    if num_cells == 1:
        c0 = c0.unsqueeze(0)
    if not batched:
        h0, c0 = h0.unsqueeze(-2), c0.unsqueeze(-2)
    return h0, c0
