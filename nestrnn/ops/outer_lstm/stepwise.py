"""The outer LSTM around any memory function, with the outer LSTM's own work fused.

Only the memory function's step and ``h = o * tanh(c)`` go through autograd; the rest of the
outer LSTM is done by hand, as in the whole-sequence op:

* ``_Prologue``: the input projection of every step is one GEMM; in the backward (which autograd
  runs after every step's, since every step consumes its output ``token``) the gradients of x and
  of every outer weight are a few large GEMMs over all steps, from the gate gradients ``dz`` the
  steps left in a shared buffer;
* ``_GatesStep``: per step, in one call of the C kernel, ``z += h_{t-1} W_hh^T`` (MKL's packed
  GEMM, the weight packed once per call), the gate activations, the two inputs of the memory
  function, ``f * c_{t-1}`` and ``i * g``, and the output gate ``o``; its backward writes the i,
  f, g, o gate gradients into ``dz`` and returns those of h_{t-1} (one GEMM) and c_{t-1};
* the memory function, as the user wrote it (or compiled, see ``outer_lstm``), and
  ``h_t = o * tanh(c_t)``, both plain autograd.

Autograd then runs one backward pass over the whole sequence: one node of ours per step besides
the memory function's, instead of the ~20 small ops of the naive path, and no weight gradient
inside the loop. It runs on CPU in float32 and float64 when the CPU kernel is available (see
``applies``); shapes as in ``naive.py``, without a projection.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nestrnn.activations import activation_code
from nestrnn.ops.nested_lstm import native
from nestrnn.ops.nested_lstm.layout import LevelWeights, time_order
from nestrnn.ops.nested_lstm.workspace import WORKSPACE

if TYPE_CHECKING:
    from nestrnn.memory.base import MemoryFunction

DTYPES = (torch.float32, torch.float64)


def applies(x: Tensor, weights: LevelWeights, h0: Tensor, c0: Tensor) -> bool:
    """Whether this path runs the call (else the naive one does)."""
    tensors = [x, h0, c0, *(w for w in weights if w is not None)]
    return (
        x.device.type == "cpu"
        and x.dtype in DTYPES
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and native.kernel() is not None
    )


class _Sequence:
    """What the steps of one call share: the gate buffer ``gates`` (T, B, 4H), which holds the
    input projection, then each step's activated gates; the h that entered each step, ``h_prev``
    (T, B, H), for the weight gradient; and ``dz`` (T, B, 4H), the gate gradients the steps'
    backwards leave for the prologue's. Per-step views and addresses are made once here: the
    steps are small, and each view costs about a microsecond."""

    def __init__(self, x: Tensor, weights: LevelWeights, candidate: str, packed: bool):
        steps, batch, _ = x.shape
        hidden = weights.weight_hh.shape[1]
        self.hidden, self.batch = hidden, batch
        self.gate, self.candidate = activation_code("sigmoid"), activation_code(candidate)
        # buffers from the pool: fresh memory would page-fault on its first touch, every call;
        # rows of a packed batch that are inactive at a step must read zero in h_prev and dz
        new = WORKSPACE.zeros if packed else WORKSPACE.empty
        dtype, device = x.dtype, x.device
        self.gates = WORKSPACE.empty((steps, batch, 4 * hidden), dtype, device)
        self.h_prev = new((steps, batch, hidden), dtype, device)
        self.dz = new((steps, batch, 4 * hidden), dtype, device)
        self.reached = [False] * steps  # steps whose backward ran (the others' dz must be 0)
        self.gates_at, self.dz_at = self.gates.unbind(0), self.dz.unbind(0)
        self.h_prev_at = self.h_prev.unbind(0)
        self.gates_ptr, self.dz_ptr = self.gates.data_ptr(), self.dz.data_ptr()
        self.stride = batch * 4 * hidden * x.element_size()  # bytes from one step to the next
        kernel = native.kernel()
        w_hh = weights.weight_hh.detach().contiguous()
        self.w_hh_t = kernel.matrix(w_hh, transposed=True, rows=batch)  # for h W_hh^T
        self.w_hh = kernel.matrix(w_hh, transposed=False, rows=batch)  # for dz W_hh
        self.outer_gates = kernel.step_function("outer_gates", x.dtype)
        self.outer_gates_backward = kernel.step_function("outer_gates_backward", x.dtype)

    def rows_at(self, views: tuple[Tensor, ...], t: int, rows: int) -> Tensor:
        return views[t] if rows == self.batch else views[t][:rows]


class _Prologue(torch.autograd.Function):
    """x, W_ih, W_hh, b_ih, b_hh -> ``token`` (no data): the input projection of every step goes
    into the shared gate buffer; the backward computes every outer parameter gradient."""

    @staticmethod
    def forward(ctx, seq: _Sequence, x, w_ih, w_hh, b_ih, b_hh):
        steps, batch, in_size = x.shape
        bias = [b for b in (b_ih, b_hh) if b is not None]
        gates = seq.gates.view(steps * batch, -1)
        if bias:
            torch.addmm(sum(bias), x.reshape(-1, in_size), w_ih.t(), out=gates)
        else:
            torch.mm(x.reshape(-1, in_size), w_ih.t(), out=gates)
        ctx.seq, ctx.has_bias = seq, (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, w_ih)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        x, w_ih = ctx.saved_tensors
        seq = ctx.seq
        steps, batch, in_size = x.shape
        for t, reached in enumerate(seq.reached):  # a loss that did not depend on every step
            if not reached:
                seq.dz_at[t].zero_()
        seq.reached = [False] * steps  # for a second backward through a retained graph
        dz = seq.dz.view(steps * batch, -1)
        need_x, need_ih, need_hh, need_bih, need_bhh = ctx.needs_input_grad[1:]
        dx = dz.mm(w_ih).view(x.shape) if need_x else None
        # (X^T dz)^T rather than dz^T X: 25-30% faster at (B, H) = (32, 75), equal at 256
        dw_ih = x.reshape(-1, in_size).t().mm(dz).t().contiguous() if need_ih else None
        h_prev = seq.h_prev.view(steps * batch, -1)
        dw_hh = h_prev.t().mm(dz).t().contiguous() if need_hh else None
        db = dz.sum(0) if need_bih or need_bhh else None
        d_bih = db if need_bih and ctx.has_bias[0] else None
        d_bhh = (db.clone() if d_bih is not None else db) if need_bhh and ctx.has_bias[1] else None
        return None, dx, dw_ih, dw_hh, d_bih, d_bhh


class _GatesStep(torch.autograd.Function):
    """(token, h_{t-1}, c_{t-1}) of the ``rows`` active rows -> ``f * c_{t-1}``, ``i * g``, ``o``."""

    @staticmethod
    def forward(ctx, token, h_prev, c_prev, seq: _Sequence, t: int):
        rows = h_prev.shape[0]
        h_prev = seq.rows_at(seq.h_prev_at, t, rows).copy_(h_prev)  # contiguous, for the kernel
        c_prev = c_prev.contiguous()
        gated_cell, gated_input, out_gate = (torch.empty_like(c_prev) for _ in range(3))
        seq.outer_gates(rows, seq.hidden, seq.gate, seq.candidate, seq.w_hh_t.handle,
                        h_prev.data_ptr(), seq.gates_ptr + t * seq.stride, c_prev.data_ptr(),
                        gated_cell.data_ptr(), gated_input.data_ptr(), out_gate.data_ptr())  # fmt: skip
        ctx.seq, ctx.t = seq, t
        ctx.save_for_backward(c_prev)
        return gated_cell, gated_input, out_gate

    @staticmethod
    def backward(ctx, d_gated_cell, d_gated_input, d_out_gate):
        (c_prev,) = ctx.saved_tensors
        seq, t, rows = ctx.seq, ctx.t, c_prev.shape[0]
        grads = [_grad(g, c_prev) for g in (d_gated_cell, d_gated_input, d_out_gate)]
        dc_prev, dh_prev = torch.empty_like(c_prev), torch.empty_like(c_prev)
        seq.outer_gates_backward(rows, seq.hidden, seq.gate, seq.candidate, seq.w_hh.handle,
                                 seq.gates_ptr + t * seq.stride, c_prev.data_ptr(),
                                 *(g.data_ptr() for g in grads), seq.dz_ptr + t * seq.stride,
                                 dc_prev.data_ptr(), dh_prev.data_ptr())  # fmt: skip
        seq.reached[t] = True
        return c_prev.new_empty(0), dh_prev, dc_prev, None, None


def _grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous gradient (autograd passes None for an output nothing used)."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _check_memory_output(memory: MemoryFunction, cell: Tensor, state, like: Tensor) -> None:
    """The next step's C function reads the cell as raw memory: check it first."""
    if cell.shape != like.shape or cell.dtype != like.dtype or len(state) != memory.num_states:
        raise RuntimeError(
            f"{type(memory).__name__} returned a cell of shape {tuple(cell.shape)} and dtype "
            f"{cell.dtype} with {len(state)} state tensors; expected {tuple(like.shape)}, "
            f"{like.dtype} and num_states={memory.num_states}"
        )


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while the loop runs: its ~20 small objects a step
    (tensors, autograd contexts) set off collections that cost a fifth of the forward at
    (B, H) = (32, 75). Everything the loop makes is freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def outer_lstm_stepwise(
    x: Tensor,
    weights: LevelWeights,
    memory: MemoryFunction,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    candidate_activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer (shapes as in ``naive.py``); see the module docstring."""
    steps, batch = x.shape[0], x.shape[1]
    sizes = [batch] * steps if batch_sizes is None else batch_sizes.tolist()
    seq = _Sequence(x, weights, candidate_activation, packed=min(sizes, default=batch) < batch)
    token = _Prologue.apply(seq, x, *weights)
    with _collector_paused():
        h, cells, outputs = _loop(seq, token, memory, h0, c0, sizes, reverse)
    if steps == 0:
        return x.new_zeros(0, batch, h0.shape[1]), h0, c0
    return torch.stack(outputs), h, torch.stack(cells)


def _loop(seq, token, memory, h0, c0, sizes, reverse):
    """The time loop of ``outer_lstm_stepwise``: the final h and cells and the output of each step."""
    steps, batch = len(sizes), h0.shape[0]
    h, cells = h0, tuple(c0.unbind(0))
    outputs: list[Tensor] = [h0.new_empty(0)] * steps
    for t in time_order(steps, reverse):
        rows = sizes[t]
        if rows == 0:
            outputs[t] = h.new_zeros(h.shape)
            continue
        active = (h, cells) if rows == batch else (h[:rows], tuple(c[:rows] for c in cells))
        gated_cell, gated_input, out_gate = _GatesStep.apply(token, active[0], active[1][0], seq, t)
        cell, state = memory(gated_cell, gated_input, active[1][1:])
        _check_memory_output(memory, cell, state, gated_cell)
        h_new = out_gate * torch.tanh(cell)
        if rows == batch:
            h, cells = h_new, (cell, *state)
            outputs[t] = h
            continue
        # a packed batch sorted by length: the rows beyond `rows` keep their state
        h = torch.cat([h_new, h[rows:]])
        cells = tuple(torch.cat([new, old[rows:]]) for new, old in zip((cell, *state), cells))
        outputs[t] = torch.cat([h_new, h_new.new_zeros(batch - rows, h_new.shape[1])])
    return h, cells, outputs


_COMPILED: weakref.WeakKeyDictionary[MemoryFunction, Any] = weakref.WeakKeyDictionary()


def compiled_step(memory: MemoryFunction):
    """``torch.compile`` of the memory function's step, made once per memory function."""
    if memory not in _COMPILED:
        _COMPILED[memory] = torch.compile(memory)
    return _COMPILED[memory]
