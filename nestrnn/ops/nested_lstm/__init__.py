"""The whole-sequence nested-LSTM op: one direction of one layer over a whole sequence.

``nested_lstm`` is the entry point; every implementation computes the function of
``naive.nested_lstm_naive`` (the reference; see that module for shapes). The package, by step:

    layout.py       argument types, activations, the tensors the forward saves (one layout for all)
    checks.py       the one input check
    planning.py     which implementation runs a call
    op.py           the PyTorch custom operators (schema, fake tensors, autograd)
    gradients.py    the parameter gradients every implementation shares (GEMMs after the loop)
    torch_lstm.py   depth-1 inference through torch's own LSTM
    c_loop.py       the C time loops on CPU (with native.py, cpu_kernel.c, workspace.py)
    torch_loop.py   the time loops in plain PyTorch, any device
    triton_loop.py  the Triton kernels on CUDA (with triton_kernels.py)
    decompose.py    the op in core ATen ops, for run_decompositions() and ONNX export
    projected.py    a layer with nn.LSTM's projection (proj_size), which the kernels lack
    naive.py        the reference: the time loop around ops/common/reference.py's cell step

Design and measurements: docs/design.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from nestrnn.ops.common.levels import (
    LevelActivations,
    LevelNorms,
    LevelWeights,
    autocast_dtype,
    encode_activations,
    standard_activations,
)
from nestrnn.ops.common.workspace import clear_workspace
from nestrnn.ops.nested_lstm import decompose as decompose  # registers the decomposition
from nestrnn.ops.nested_lstm import op, torch_lstm
from nestrnn.ops.nested_lstm.checks import check_inputs
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive
from nestrnn.ops.nested_lstm.planning import BACKENDS, IMPLEMENTATIONS, Plan, plan

__all__ = [
    "BACKENDS",
    "IMPLEMENTATIONS",
    "LevelActivations",
    "LevelNorms",
    "LevelWeights",
    "Plan",
    "clear_workspace",
    "nested_lstm",
    "nested_lstm_naive",
    "plan",
]


def nested_lstm(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    activations: tuple[LevelActivations, ...] | None = None,
    backend: str = "auto",
    zoneout: Tensor | None = None,
    norms: Sequence[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer over a whole sequence.

    Args:
        x: (T, B, I) input.
        weights: D ``LevelWeights``; level 0 is the outer LSTM (weight_ih (4H, I)), levels 1..D-1
            are nested (weight_ih (4H, H)); every weight_hh is (4H, H); biases (4H,) or None.
        h0: (B, H) initial hidden state; c0: (D, B, H) initial cell of every level.
        batch_sizes: (T,) int64 CPU tensor of a packed batch sorted by length (rows
            b >= batch_sizes[t] are inactive at step t: they keep their state, output zero).
        reverse: process the sequence from its end.
        activations: D ``LevelActivations`` (None: the paper's, ``standard_activations``).
        backend: "auto", "triton" or another implementation name (see ``plan``).
        zoneout: (D + 1, T, B, H) keep weights in [0, 1], or None: ``zoneout[k, t]`` mixes the
            cell of level k carried past step t with its previous value (``z * previous +
            (1 - z) * new``), ``zoneout[D, t]`` likewise h, which is also the output; the step
            itself reads the unzoned new cells. Training passes 0/1 masks, evaluation the rates
            expanded along T and B (any strides there, the last dimension contiguous); any
            floating dtype (read in the state's); no gradient flows to it.
        norms: D ``LevelNorms`` (layer normalisation of the level's gate blocks and new cell,
            docs/design.md) or None for a level without, or None: none at all. Each tensor has
            the input's dtype and device; they get gradients.

    Returns:
        ``(output (T, B, H), h_n (B, H), c_n (D, B, H))`` in the dtype of ``x``; under
        ``torch.autocast`` every floating input is first cast to the autocast dtype.
    """
    dtype = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if dtype is not None:
        x, h0, c0 = x.to(dtype), h0.to(dtype), c0.to(dtype)
        weights = [
            LevelWeights._make(w if w is None else w.to(dtype) for w in lw) for lw in weights
        ]
    if dtype is not None and norms is not None:
        norms = [None if n is None else LevelNorms._make(t.to(dtype) for t in n) for n in norms]
    check_inputs(x, weights, h0, c0, batch_sizes, activations, zoneout, norms)
    if norms is not None and all(n is None for n in norms):
        norms = None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    levels = activations or standard_activations(len(weights))
    acts = encode_activations(levels)
    flat = op.flat_weights(weights, x)
    flat_n = None if norms is None else op.flat_norms(norms, x)
    args = (batch_sizes, bool(reverse), acts, backend, zoneout, flat_n)
    tensors = (x, h0, c0, *flat, *(flat_n or []))
    # An exported graph holds the inference op, and so does a traced one: torch.jit.trace checks
    # its graph by tracing again without grad mode, and the graph must not depend on grad mode.
    # The inference op is differentiable too (its backward recomputes the forward).
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return torch.ops.nestrnn.nested_lstm(x, flat, h0, c0, *args)
    if _differentiating_transform(tensors):
        return nested_lstm_naive(
            x, weights, h0, c0, batch_sizes, reverse, levels, zoneout=zoneout, norms=norms
        )
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return torch.ops.nestrnn.nested_lstm(x, flat, h0, c0, *args)
    vmapped = torch._C._are_functorch_transforms_active()  # torch's LSTM has no batching rule
    if zoneout is None and norms is None and not (vmapped or torch.compiler.is_compiling()):
        chosen = plan(
            x, batch_sizes, reverse, levels, True, backend, eager=True, hidden=h0.shape[1]
        )
        if chosen.implementation == "torch_lstm":
            return torch_lstm.forward(x, weights[0], h0, c0, batch_sizes, reverse)
    return torch.ops.nestrnn.nested_lstm_train(x, flat, h0, c0, *args)[:3]


def _differentiating_transform(tensors) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) or a
    ``torch.func`` transform that differentiates (``grad``, ``vjp``, ``jacrev``...) sees this
    call. The operators have batching rules (``torch.func.vmap``) and an autograd formula, but a
    custom operator's registered autograd has no jvp, and torch.func's own differentiation needs
    an autograd.Function with ``setup_context``, which it lacks; so under these the reference
    runs: plain PyTorch operations, which every transform follows at every order, exactly."""
    if torch.compiler.is_compiling():
        return False
    # dual tensors exist only inside a dual level: outside one (every ordinary call), no tensor
    # needs unpacking
    in_dual_level = forward_ad._current_level >= 0
    if in_dual_level and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(
        level.key() in (TransformType.Grad, TransformType.Jvp)
        for level in retrieve_all_functorch_interpreters()
    )
