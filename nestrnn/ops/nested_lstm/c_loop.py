"""The op's CPU implementation: its time loops in C (``cpu_kernel.c``, built by ``native.py``).

This module owns the buffers and the work outside the loops; the kernel runs the loops:

* the outer input projection of every step, ``x W_ih^T + b``, is one GEMM into ``gates[0]``;
* the forward kernel, per step: the recurrent GEMMs (``h W_hh^T``, and ``[x~ | h~] [W_ih | W_hh]^T``
  per nested level, MKL's packed form where present) and every pointwise op of the step, in one
  pass per level over the tile its GEMM just wrote;
* the backward kernel: the reverse loop for the gate and state gradients only (the parameter
  gradients follow in ``gradients.py``).

Inputs: float32 or float64 CPU tensors (the op casts half precision to float32 first). Without
``save`` the per-step buffers are rings of one step. Zoneout's weights are read where they lie
(in the state dtype, at their strides; the op makes their last dimension contiguous). Layer
normalisation (``norms``) runs in the kernel too; the backward kernel adds the gradients of its
parameters into buffers this module gives it. Why C, and what was measured: docs/design.md.
"""

from __future__ import annotations

import ctypes
from typing import cast

import torch
from torch import Tensor

from nestrnn.activations import activation_code
from nestrnn.ops.common import native
from nestrnn.ops.common.levels import LevelActivations, LevelNorms, LevelWeights
from nestrnn.ops.common.workspace import WORKSPACE
from nestrnn.ops.nested_lstm.layout import Saved, empty_saved, state_slots

DTYPES = (torch.float32, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the C loop cannot compute in ``dtype`` on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"input on {device}"
    if dtype not in DTYPES:
        return f"dtype {dtype}"
    found = native.status()
    return None if found.available else found.reason


class _Weights:
    """Every level's weights as the kernel reads them (contiguous, nn.LSTM's gate order); the
    biases only where the forward needs them (the backward does not read them)."""

    def __init__(self, weights: list[LevelWeights], with_bias: bool):
        self.w_hh0 = weights[0].weight_hh.contiguous()
        self.nested: list[Tensor | None] = [None]  # level k >= 1: (4H, 2H) [W_ih | W_hh]
        self.bias = [lw.combined_bias() if with_bias else None for lw in weights]
        for w_ih, w_hh, _, _ in weights[1:]:
            hidden = w_hh.shape[1]
            both = WORKSPACE.empty((4 * hidden, 2 * hidden), w_hh.dtype, w_hh.device)
            both[:, :hidden].copy_(w_ih)
            both[:, hidden:].copy_(w_hh)
            self.nested.append(both)


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * max(len(tensors), 1))(
        *(None if t is None else t.data_ptr() for t in tensors)
    )


class _Call:
    """The kernel's argument struct, with every array it points to kept alive."""

    def __init__(
        self,
        steps,
        weights,
        buffers,
        h_slots,
        sizes,
        reverse,
        save,
        activations,
        zoneout,
        norms=None,
        norm_buffers=None,
    ):
        gates, cells, act_cells, inputs = buffers  # in the order of layout.Saved
        batch, hidden = gates[0].shape[1], weights.w_hh0.shape[1]
        self.weights = weights
        self.sizes = None if sizes is None else torch.tensor(sizes, dtype=torch.int64)
        codes = [activation_code(name) for level in activations for name in level]
        self.codes = torch.tensor(codes, dtype=torch.int32)
        self.arrays = {
            "gates": _pointers(gates),
            "inputs": _pointers(inputs),
            "cells": _pointers(cells),
            "act_cells": _pointers(act_cells),
            "h": _pointers(h_slots),
            "w_nested": _pointers(weights.nested),
            "bias": _pointers(weights.bias),
        }
        self.args = native.Args(
            steps=steps,
            batch=batch,
            hidden=hidden,
            depth=len(cells),
            reverse=int(reverse),
            save=int(save),
            batch_sizes=None if self.sizes is None else self.sizes.data_ptr(),
            activations=self.codes.data_ptr(),
            w_hh0=weights.w_hh0.data_ptr(),
            **{name: ctypes.cast(arr, ctypes.c_void_p) for name, arr in self.arrays.items()},
        )
        self.zoneout = zoneout  # kept alive with the struct that points to it
        if zoneout is not None:
            self.args.zoneout = zoneout.data_ptr()
            strides = zoneout.stride()[:3]
            self.args.zoneout_level_stride, self.args.zoneout_step_stride = strides[:2]
            self.args.zoneout_row_stride = strides[2]
        if norms is not None:  # kept alive with the struct, as the arrays
            self.norms = [None if n is None else [t.contiguous() for t in n] for n in norms]
            flat = [t for n in self.norms for t in (n if n is not None else [None] * 4)]
            self.arrays["norms"] = _pointers(flat)
            for name, tensors in zip(("norm_gates", "norm_cells", "inv_std"), norm_buffers):
                self.arrays[name] = _pointers(tensors)
            for name in ("norms", "norm_gates", "norm_cells", "inv_std"):
                setattr(self.args, name, ctypes.cast(self.arrays[name], ctypes.c_void_p))


def _h_slots(out: Tensor, h0: Tensor, packed: bool, reverse: bool) -> tuple[list[Tensor], Tensor]:
    """The T+1 slots of h as (B, H) tensors in slot order, and the tensor holding them.

    Unpacked: the output itself plus a copy of h0. Packed: a separate (T+1, B, H) buffer, since
    inactive rows carry their state there while the output must show zeros.
    """
    steps = out.shape[0]
    if packed:
        store = WORKSPACE.empty((steps + 1, *h0.shape), h0.dtype, h0.device)
        store[steps if reverse else 0].copy_(h0)
        return list(store.unbind(0)), store
    first = h0.clone()
    slots = list(out.unbind(0))
    return ([*slots, first] if reverse else [first, *slots]), out


def forward(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    sizes: list[int] | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    save: bool,
    zoneout: Tensor | None = None,
    norms: list[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Saved | None]:
    """The whole forward without autograd: output (T, B, H), h_n, c_n and, with ``save``, the
    tensors of ``layout.Saved``. ``zoneout``: (D + 1, T, B, H) keep weights in x's dtype, its
    last dimension contiguous, or None; ``norms``: each level's layer normalisation in x's dtype
    (None at a level without), or None."""
    steps, batch, in_size = x.shape
    depth, hidden = c0.shape[0], h0.shape[1]
    packed = sizes is not None and min(sizes) < batch
    dtype, device = x.dtype, x.device
    new = WORKSPACE.empty
    normalised = norms is not None
    norm_buffers = None
    if save:
        saved = empty_saved(
            steps, batch, hidden, depth, dtype, device, packed, new, normalised=normalised
        )
        gates, cells, act_cells, inputs = (list(t.unbind(0)) for t in saved[:4])
        if normalised:
            norm_buffers = [list(t.unbind(0)) for t in saved[4:]]
    else:  # rings: level 0's gates still hold the input projection of every step
        saved = None
        gates = [
            new((steps if k == 0 else 1, batch, 4 * hidden), dtype, device) for k in range(depth)
        ]
        inputs = [new((1, batch, 2 * hidden), dtype, device) for _ in range(depth - 1)]
        cells = [new((2, batch, hidden), dtype, device) for _ in range(depth)]
        act_cells = [new((1, batch, hidden), dtype, device) for _ in range(depth)]
        if normalised:
            norm_buffers = [
                [new((1, batch, width), dtype, device) for _ in range(depth)]
                for width in (4 * hidden, hidden, 5)
            ]
    first, last = state_slots(steps, reverse)
    for cell, c in zip(cells, c0):
        cell[first % cell.shape[0]].copy_(c)
    w = _Weights(weights, with_bias=True)
    projection = gates[0].view(steps * batch, 4 * hidden)
    x2 = x.reshape(steps * batch, in_size)
    if w.bias[0] is None:
        torch.mm(x2, weights[0].weight_ih.t(), out=projection)
    else:
        torch.addmm(w.bias[0], x2, weights[0].weight_ih.t(), out=projection)

    out = torch.empty(steps, batch, hidden, dtype=dtype, device=device)
    h_slots, h_store = _h_slots(out, h0, packed, reverse)
    buffers = (gates, cells, act_cells, inputs)
    call = _Call(
        steps, w, buffers, h_slots, sizes, reverse, save, activations, zoneout, norms, norm_buffers
    )
    cast(native.Kernel, native.kernel()).forward(dtype, call.args)  # checked by the caller

    h_n = h_slots[last].clone()
    c_n = c0.new_empty(c0.shape)  # (torch.stack below autograd would return a view)
    for k, cell in enumerate(cells):
        c_n[k].copy_(cell[last % cell.shape[0]])
    if packed:
        mask = call.sizes.unsqueeze(1) > torch.arange(batch)
        out.copy_(h_store[1:] if not reverse else h_store[:steps])
        out.mul_(mask.unsqueeze(2).to(dtype))
    return out, h_n, c_n, saved


def backward(
    saved: Saved,
    weights: list[LevelWeights],
    sizes: list[int] | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    zoneout: Tensor | None = None,
    norms: list[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, list[LevelNorms | None]]:
    """The reverse time loop: gate gradients ``dz`` (D, T, B, 4H) and the gradients of h0, c0
    (``zoneout`` and ``norms`` as the forward's; with ``norms``, the gradients of each level's
    ``LevelNorms`` follow, as ``torch_loop.backward``'s)."""
    _, steps, batch, four_h = saved.gates.shape
    hidden = four_h // 4
    dtype, device = d_out.dtype, d_out.device
    packed = sizes is not None and min(sizes) < batch
    dz = (WORKSPACE.zeros if packed else WORKSPACE.empty)(saved.gates.shape, dtype, device)
    dh = d_hn.clone(memory_format=torch.contiguous_format)
    dc = d_cn.clone(memory_format=torch.contiguous_format)
    d_out = d_out.contiguous()
    scratch = torch.empty(batch, 2 * hidden, dtype=dtype)
    dht = torch.empty(batch, hidden, dtype=dtype)
    buffers = tuple(list(t.unbind(0)) for t in saved[:4])
    w = _Weights(weights, with_bias=False)
    norm_buffers = None if norms is None else [list(t.unbind(0)) for t in saved[4:]]
    call = _Call(
        steps, w, buffers, [], sizes, reverse, True, activations, zoneout, norms, norm_buffers
    )
    d_norms: list[LevelNorms | None] = []
    if norms is not None:
        d_norms = [None if n is None else LevelNorms._make(map(torch.zeros_like, n)) for n in norms]
        flat = [t for n in d_norms for t in (n if n is not None else [None] * 4)]
        call.arrays["d_norms"] = _pointers(flat)
        call.args.d_norms = ctypes.cast(call.arrays["d_norms"], ctypes.c_void_p)
    call.arrays["d_gates"] = _pointers(list(dz.unbind(0)))
    args = call.args
    args.d_out, args.dh, args.dc = d_out.data_ptr(), dh.data_ptr(), dc.data_ptr()
    args.d_gates = ctypes.cast(call.arrays["d_gates"], ctypes.c_void_p)
    args.scratch, args.dht = scratch.data_ptr(), dht.data_ptr()
    cast(native.Kernel, native.kernel()).backward(dtype, args)
    if norms is not None:
        return dz, dh, dc, d_norms
    return dz, dh, dc
