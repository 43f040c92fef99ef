"""The op's one input check: every argument's type, shape, dtype and device, before any work.

A bad argument gets a one-line ``ValueError`` naming it and what was expected, never an error
from inside a kernel (the C and Triton kernels read raw memory and would misread it silently).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from nestrnn.activations import check_activation
from nestrnn.ops.common.levels import LevelActivations, LevelNorms, LevelWeights


def _tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace records the call (values unknown)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def check_inputs(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    activations: tuple[LevelActivations, ...] | None,
    zoneout: Tensor | None = None,
    norms: Sequence[LevelNorms | None] | None = None,
) -> None:
    """Raise a clear error for anything the op cannot run (shapes as in ``naive.py``)."""
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point (T, B, I) tensor, got {shape}")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one level")
    steps, batch, in_size = x.shape
    hidden = weights[0].weight_hh.shape[-1]
    depth = len(weights)
    named: list[tuple[str, Tensor | None, tuple[int, ...]]] = [
        ("h0", h0, (batch, hidden)),
        ("c0", c0, (depth, batch, hidden)),
    ]
    for k, level in enumerate(weights):
        expected = {
            "weight_ih": (4 * hidden, in_size if k == 0 else hidden),
            "weight_hh": (4 * hidden, hidden),
            "bias_ih": (4 * hidden,),
            "bias_hh": (4 * hidden,),
        }
        for field, tensor in zip(LevelWeights._fields, level):
            if tensor is None and field.startswith("bias"):
                continue
            named.append((f"level {k} {field}", tensor, expected[field]))
    if norms is not None:
        if len(norms) != depth:
            raise ValueError(
                f"norms must hold {depth} levels (None for a level without), got {len(norms)}"
            )
        for k, level_norms in enumerate(norms):
            if level_norms is None:
                continue
            if not isinstance(level_norms, tuple) or len(level_norms) != 4:
                raise ValueError(f"level {k} norms must be a LevelNorms of 4 tensors or None")
            for field, tensor in zip(LevelNorms._fields, level_norms):
                size = 4 * hidden if field.startswith("gates") else hidden
                named.append((f"level {k} norms {field}", tensor, (size,)))
    for name, tensor, shape in named:
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device} but x is {x.dtype} on {x.device}; "
                "the state and every weight must have the input's dtype and device"
            )
    if batch_sizes is not None:
        _check_batch_sizes(batch_sizes, steps, batch)
    if zoneout is not None:
        _check_zoneout(zoneout, (depth + 1, steps, batch, hidden), x.device)
    if activations is not None:
        if len(activations) != depth:
            raise ValueError(f"activations must name {depth} levels, got {len(activations)}")
        for k, names in enumerate(activations):
            for field, activation in zip(LevelActivations._fields, names):
                check_activation(activation, f"level {k} {field} activation")


def _check_batch_sizes(batch_sizes: Tensor, steps: int, batch: int) -> None:
    if batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
        raise ValueError(
            f"batch_sizes must be an int64 CPU tensor, got {batch_sizes.dtype} on "
            f"{batch_sizes.device}"
        )
    if tuple(batch_sizes.shape) != (steps,):
        raise ValueError(f"batch_sizes must be ({steps},), got {tuple(batch_sizes.shape)}")
    if _tracing() or steps == 0:
        return
    sizes = batch_sizes.tolist()
    if sizes[0] > batch or min(sizes) < 0 or any(a < b for a, b in itertools.pairwise(sizes)):
        raise ValueError(
            f"batch_sizes must be non-increasing counts of active rows in [0, {batch}], got {sizes}"
        )


def _check_zoneout(zoneout: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    expected = f"a floating-point {shape} tensor (D + 1, T, B, H) on {device}"
    if not isinstance(zoneout, Tensor):
        raise ValueError(f"zoneout must be {expected} or None, got {type(zoneout).__name__}")
    if tuple(zoneout.shape) != shape or not zoneout.is_floating_point():
        raise ValueError(f"zoneout must be {expected}, got {zoneout.dtype} {tuple(zoneout.shape)}")
    if zoneout.device != device:
        raise ValueError(f"zoneout must be {expected}, got a tensor on {zoneout.device}")
