"""The fast op's CPU path with its time loops in C (``cpu_kernel.c``, built by ``native.py``).

Same contract and autograd Function as ``fused.py`` (which picks this path for float32/float64
CPU tensors when the kernel is available); this module owns the buffers and the large GEMMs:

* the outer input projection of every step, ``x W_ih^T + b``, is one GEMM into ``gates[0]``;
* the kernel runs the time loop: per step the recurrent GEMMs (``h W_hh^T``, and
  ``[x~ | h~] [W_ih | W_hh]^T`` per nested level, one GEMM each, MKL's packed form where present)
  and every pointwise op of the step, in one pass per level;
* the backward kernel runs the reverse loop for state and gate gradients; every weight gradient
  is then one GEMM over all steps (``dz^T [x~ | h~]`` per nested level).

Why C: at (B, H) = (32, 256) a step's pointwise work is ~20 PyTorch calls of a few microseconds
each, as long as the GEMMs themselves; in C each level's pointwise phase is one loop over the
tile the GEMM just wrote.

Buffers (row-major, contiguous; n = T when saving for the backward, else 1):
    gates[k]  (T for k = 0 else n, B, 4H)  gates [o | i | f | g], activated in place
    inputs[k] (n, B, 2H)  [x~ | h~] = [i*g | f*c_prev] of level k (k < D-1), level k+1's input
    cells[k]  (T+1 or 2, B, H)  slot j = the cell before step j (forward order)
    tanh_c[k] (n, B, H)
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch import Tensor

from nestrnn.ops.nested_lstm import native
from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.fused import (
    _WORKSPACE,
    _h_prev_pieces,
    _h_slot_list,
    _h_slots,
    _internal,
    _outer_grads,
    _packed_output,
    _summed_bias,
)

NATIVE_DTYPES = (torch.float32, torch.float64)


def applies(x: Tensor) -> bool:
    """True when the C kernel runs this input (CPU, float32/float64, kernel built)."""
    if x.device.type != "cpu" or x.dtype not in NATIVE_DTYPES:
        return False
    return native.kernel() is not None


class Prepared(NamedTuple):
    """Every level's weights in the internal gate order (o, i, f, g), contiguous."""

    w_ih0: Tensor  # (4H, I)
    bias0: Tensor | None  # (4H,) b_ih + b_hh
    w_hh0: Tensor  # (4H, H)
    w_nested: list[Tensor | None]  # level k >= 1: (4H, 2H) [W_ih | W_hh]; entry 0 unused
    bias: list[Tensor | None]  # level k >= 1: (4H,)


def prepare(weights: list[LevelWeights], hidden: int, for_backward: bool) -> Prepared:
    """Permute (and concatenate) the weights once per call, into pooled buffers."""
    H = hidden
    w_ih0, w_hh0, b_ih0, b_hh0 = weights[0]
    dtype, device = w_hh0.dtype, w_hh0.device

    def new(*shape):
        return _WORKSPACE.empty(shape, dtype, device)

    w_nested: list[Tensor | None] = [None]
    bias: list[Tensor | None] = [None]
    for w_ih, w_hh, b_ih, b_hh in weights[1:]:
        w = new(4 * H, 2 * H)
        _internal(w_ih, H, w[:, :H])
        _internal(w_hh, H, w[:, H:])
        w_nested.append(w)
        bias.append(_summed_bias(b_ih, b_hh, H))
    return Prepared(
        w_ih0=_internal(w_ih0, H, new(*w_ih0.shape)),
        bias0=_summed_bias(b_ih0, b_hh0, H),
        w_hh0=_internal(w_hh0, H, new(4 * H, H)),
        w_nested=w_nested,
        bias=bias,
    )


class _Buffers(NamedTuple):
    gates: list[Tensor]
    inputs: list[Tensor]
    cells: list[Tensor]
    tanh_c: list[Tensor]
    h_store: Tensor  # unpacked: the output (T, B, H); packed: every slot's h (T+1, B, H)
    h_init: Tensor | None  # unpacked: h0 (1, B, H); packed: None (it is in h_store)


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * max(len(tensors), 1))(
        *(None if t is None else t.data_ptr() for t in tensors)
    )


def _args(bufs: _Buffers, prep: Prepared, hs: list[Tensor], sizes_t, reverse, save) -> native.Args:
    steps, batch, four_h = bufs.gates[0].shape
    arrays = {
        "gates": _pointers(bufs.gates),
        "inputs": _pointers(bufs.inputs),
        "cells": _pointers(bufs.cells),
        "tanh_c": _pointers(bufs.tanh_c),
        "h": _pointers(hs),
        "w_nested": _pointers(prep.w_nested),
        "bias": _pointers(prep.bias),
    }
    args = native.Args(
        steps=steps,
        batch=batch,
        hidden=four_h // 4,
        depth=len(bufs.cells),
        reverse=int(reverse),
        save=int(save),
        cell_slots=bufs.cells[0].shape[0],
        batch_sizes=None if sizes_t is None else sizes_t.data_ptr(),
        w_hh0=prep.w_hh0.data_ptr(),
        **{name: ctypes.cast(arr, ctypes.c_void_p) for name, arr in arrays.items()},
    )
    args._keep = arrays  # the pointer arrays must outlive the call
    return args


def forward(x, prep: Prepared, h0, c0, sizes, reverse, save):
    """The whole forward without autograd: output, h_n, c_n and the saved tensors (or None)."""
    steps, batch, inputs = x.shape
    depth, H = c0.shape[0], h0.shape[1]
    opts = (x.dtype, x.device)
    packed = sizes is not None and min(sizes) < batch
    n = steps if save else 1
    new = _WORKSPACE.empty
    # inactive rows of packed batches meet zero gradients in the weight GEMMs: keep them finite
    new_finite = _WORKSPACE.zeros if packed else new
    h_store, h_init = _h_slots(steps, batch, H, packed, *opts)
    bufs = _Buffers(
        gates=[new((steps if k == 0 else n, batch, 4 * H), *opts) for k in range(depth)],
        inputs=[new_finite((n, batch, 2 * H), *opts) for _ in range(depth - 1)],
        cells=[new((steps + 1 if save else 2, batch, H), *opts) for _ in range(depth)],
        tanh_c=[new((n, batch, H), *opts) for _ in range(depth)],
        h_store=h_store,
        h_init=h_init,
    )
    hs = _h_slot_list(h_store, h_init, reverse)
    first = steps if reverse else 0  # slot of the initial state
    hs[first].copy_(h0)
    for cell, c in zip(bufs.cells, c0):
        cell[first % cell.shape[0]].copy_(c)
    gates0 = bufs.gates[0].view(steps * batch, 4 * H)
    x2 = x.reshape(steps * batch, inputs)
    if prep.bias0 is None:
        torch.mm(x2, prep.w_ih0.t(), out=gates0)
    else:
        torch.addmm(prep.bias0, x2, prep.w_ih0.t(), out=gates0)

    sizes_t = None if sizes is None else torch.tensor(sizes, dtype=torch.int64)
    native.kernel().forward(x.dtype, _args(bufs, prep, hs, sizes_t, reverse, save))

    last = 0 if reverse else steps
    h_n = hs[last].clone()  # not a view of the output
    c_n = torch.stack([cell[last % cell.shape[0]] for cell in bufs.cells])
    out = _packed_output(h_store, sizes, reverse) if packed else h_store
    saved = _flatten(bufs) if save else None
    return out, h_n, c_n, saved


def _flatten(bufs: _Buffers) -> list[Tensor | None]:
    """All buffers as one list (for ``save_for_backward``); ``_unflatten`` inverts it."""
    return [bufs.h_store, bufs.h_init, *bufs.gates, *bufs.inputs, *bufs.cells, *bufs.tanh_c]


def _unflatten(tensors) -> _Buffers:
    depth = (len(tensors) - 1) // 4
    rest = tensors[2:]
    gates, rest = rest[:depth], rest[depth:]
    inputs, rest = rest[: depth - 1], rest[depth - 1 :]
    return _Buffers(gates, inputs, rest[:depth], rest[depth:], tensors[0], tensors[1])


def backward(tensors, x, prep: Prepared, sizes, reverse, d_out, d_hn, d_cn, needs):
    """Reverse loop in the kernel, then every weight gradient as one GEMM over all steps.
    Returns gradients with gate rows in the internal order (see ``fused._backward``)."""
    bufs = _unflatten(tensors)
    steps, batch = x.shape[0], x.shape[1]
    depth, H = len(bufs.cells), d_hn.shape[1]
    opts = (d_out.dtype, d_out.device)
    packed = sizes is not None and min(sizes) < batch
    alloc = _WORKSPACE.zeros if packed else _WORKSPACE.empty
    dz = [alloc((steps, batch, 4 * H), *opts) for _ in range(depth)]
    dh = d_hn.clone(memory_format=torch.contiguous_format)
    dc = d_cn.clone(memory_format=torch.contiguous_format)
    d_out = d_out.contiguous()
    scratch = torch.empty(batch, 2 * H, dtype=d_out.dtype)
    dht = torch.empty(batch, H, dtype=d_out.dtype)

    sizes_t = None if sizes is None else torch.tensor(sizes, dtype=torch.int64)
    hs = _h_slot_list(bufs.h_store, bufs.h_init, reverse)
    args = _args(bufs, prep, hs, sizes_t, reverse, save=True)
    args.d_out, args.dh, args.dc = d_out.data_ptr(), dh.data_ptr(), dc.data_ptr()
    d_gates = _pointers(dz)
    args.d_gates = ctypes.cast(d_gates, ctypes.c_void_p)
    args.scratch, args.dht = scratch.data_ptr(), dht.data_ptr()
    native.kernel().backward(x.dtype, args)

    h_prev = _h_prev_pieces(bufs.h_store, bufs.h_init, steps, reverse)
    grads = _outer_grads(x, prep.w_ih0, dz, h_prev, dh, dc, needs)
    rows = steps * batch
    for k in range(1, depth):  # one GEMM for both weights of a nested level
        if needs[f"w_ih{k}"] or needs[f"w_hh{k}"]:
            dw = torch.mm(dz[k].view(rows, 4 * H).t(), bufs.inputs[k - 1].view(rows, 2 * H))
            grads[f"w_ih{k}"], grads[f"w_hh{k}"] = dw[:, :H], dw[:, H:]
    return grads
