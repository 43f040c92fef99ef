"""The outer LSTM around any memory function, with the outer LSTM's own work fused.

Only the memory function's step goes through autograd; the outer LSTM's work is done by hand, in
the C kernel, as in the whole-sequence op:

* ``_Prologue``: the input projection of every step is one GEMM; in the backward (which autograd
  runs after every step's, since every step consumes its output ``token``) the gradients of x and
  of every outer weight are a few large GEMMs over all steps, from the gate gradients ``dz`` the
  steps left in a shared buffer;
* ``_GatesStep``: the first step's gates: ``z += h_{t-1} W_hh^T`` (MKL's packed GEMM, the weight
  packed once per call), the gate activations and the two inputs of the memory function,
  ``f * c_{t-1}`` and ``i * g``; its backward writes the gate gradients into ``dz`` and returns
  those of h_{t-1} (one GEMM) and c_{t-1};
* ``_Transition``: what lies between two memory calls, in one node and one kernel call: this
  step's ``h_t = o * tanh(c_t)`` and the next step's gates from it; ``_Output``: the last step's h.
  Native (C++) nodes do the same work where they could be built (``native_nodes.py``).

Each of these nodes also takes an empty ``link`` tensor from the step before and gives one to the
next: h_t depends on the step's gates whatever the memory function does with its inputs, so the
backward must reach every earlier step (and the prologue) even from a memory function that
detaches them, or ignores them.

Autograd then runs one backward pass over the whole sequence: one node of ours per step besides
the memory function's, instead of the ~20 small ops of the naive path, and no weight gradient
inside the loop. A packed batch, whose active rows change from step to step, keeps ``_GatesStep``
at every step and computes h with plain autograd. This path runs on CPU in float32 and float64
when the CPU kernel is available (see ``applies``); shapes as in ``naive.py``, without a
projection.
"""

from __future__ import annotations

import ctypes
import functools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nestrnn.activations import activation_code
from nestrnn.ops.nested_lstm import native
from nestrnn.ops.nested_lstm.layout import LevelWeights, time_order
from nestrnn.ops.nested_lstm.workspace import WORKSPACE
from nestrnn.ops.outer_lstm import native_nodes
from nestrnn.ops.outer_lstm.naive import active_rows, merge_rows

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
    (T, B, H), for the weight gradient; ``act_cells`` (T, B, H), tanh of each new cell; and ``dz``
    (T, B, 4H), the gate gradients the steps' backwards leave for the prologue's. The steps
    address them by pointer arithmetic (``z`` and the like): a view costs about a microsecond, a
    step tens."""

    def __init__(self, x: Tensor, weights: LevelWeights, candidate: str, packed: bool):
        steps, batch, _ = x.shape
        hidden = weights.weight_hh.shape[1]
        self.hidden, self.batch = hidden, batch
        self.gate, self.candidate = activation_code("sigmoid"), activation_code(candidate)
        self.cell = activation_code("tanh")
        # buffers from the pool: fresh memory would page-fault on its first touch, every call;
        # rows of a packed batch that are inactive at a step must read zero in h_prev and dz
        new = WORKSPACE.zeros if packed else WORKSPACE.empty
        dtype, device = x.dtype, x.device
        self.gates = WORKSPACE.empty((steps, batch, 4 * hidden), dtype, device)
        self.h_prev = new((steps, batch, hidden), dtype, device)
        self.dz = new((steps, batch, 4 * hidden), dtype, device)
        self.act_cells = WORKSPACE.empty((steps, batch, hidden), dtype, device)
        self.scratch = torch.empty(batch, hidden, dtype=dtype, device=device)
        # per step, whether a backward wrote its gate gradients into dz (the others' must be 0),
        # and whether one wrote the o gradient of its output (else the gates' backward takes 0):
        # bytes that the native nodes share, seen here through ctypes views
        self.flags = torch.zeros(2, steps, dtype=torch.uint8)
        view = ctypes.c_uint8 * steps
        self.reached = view.from_address(self.flags.data_ptr())
        self.output_reached = view.from_address(self.flags[1].data_ptr())
        self.gates_ptr, self.dz_ptr = self.gates.data_ptr(), self.dz.data_ptr()
        self.h_prev_ptr, self.act_ptr = self.h_prev.data_ptr(), self.act_cells.data_ptr()
        self.stride = batch * 4 * hidden * x.element_size()  # bytes from one step to the next
        self.state_stride = batch * hidden * x.element_size()
        kernel = native.kernel()
        w_hh = weights.weight_hh.detach().contiguous()
        self.w_hh_t = kernel.matrix(w_hh, transposed=True, rows=batch)  # for h W_hh^T
        self.w_hh = kernel.matrix(w_hh, transposed=False, rows=batch)  # for dz W_hh
        for name in ("outer_gates", "outer_transition", "outer_output"):
            setattr(self, name, kernel.step_function(name, x.dtype))
            setattr(self, f"{name}_backward", kernel.step_function(f"{name}_backward", x.dtype))
        self.nodes = None if packed else self._native_sequence(kernel, w_hh)

    def _native_sequence(self, kernel: native.Kernel, w_hh: Tensor):
        """What the native nodes share (they own the weight matrices from then on), or None
        when they are unavailable: then ``_Transition`` and ``_Output`` do their work."""
        nodes = native_nodes.module()
        if nodes is None:
            return None
        dtype = w_hh.dtype
        functions = ("outer_transition", "outer_transition_backward", "outer_output",
                     "outer_output_backward")  # fmt: skip
        sequence = nodes.Sequence(
            self.gates, self.dz, self.h_prev, self.act_cells, self.flags, w_hh,
            self.w_hh_t.handle, self.w_hh.handle, kernel.matrix_free_address(dtype),
            (self.gate, self.candidate, self.cell),
            tuple(kernel.step_address(name, dtype) for name in functions),
        )  # fmt: skip
        self.w_hh_t.release()
        self.w_hh.release()
        return sequence

    def z(self, t: int) -> int:
        """Address of step t's gates."""
        return self.gates_ptr + t * self.stride

    def dz_at_step(self, t: int) -> int:
        """Address of step t's gate gradients."""
        return self.dz_ptr + t * self.stride

    def act(self, t: int) -> int:
        """Address of tanh of step t's new cell."""
        return self.act_ptr + t * self.state_stride


class _Prologue(torch.autograd.Function):
    """x, W_ih, W_hh, b_ih, b_hh -> ``token`` (no data): the input projection of every step goes
    into the shared gate buffer; the backward computes every outer parameter gradient."""

    @staticmethod
    def forward(ctx, seq: _Sequence, x, w_ih, w_hh, b_ih, b_hh):
        steps, batch, in_size = x.shape
        bias = LevelWeights(w_ih, w_hh, b_ih, b_hh).combined_bias()
        gates = seq.gates.view(steps * batch, -1)
        if bias is not None:
            torch.addmm(bias, x.reshape(-1, in_size), w_ih.t(), out=gates)
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
                seq.dz[t].zero_()
        seq.flags.zero_()  # for a second backward through a retained graph
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
    """(token, h_{t-1}, c_{t-1}) of the ``rows`` active rows -> ``f * c_{t-1}``, ``i * g``, ``o``
    and a link to the next step's node (the first step of a sequence, and every step of a packed
    batch)."""

    @staticmethod
    def forward(ctx, token, h_prev, c_prev, seq: _Sequence, t: int):
        rows, slot = h_prev.shape[0], seq.h_prev[t]
        h_prev = (slot if rows == seq.batch else slot[:rows]).copy_(h_prev)  # contiguous
        c_prev = c_prev.contiguous()
        gated_cell, gated_input, out_gate = (torch.empty_like(c_prev) for _ in range(3))
        seq.outer_gates(rows, seq.hidden, seq.gate, seq.candidate, seq.w_hh_t.handle,
                        h_prev.data_ptr(), seq.z(t), c_prev.data_ptr(),
                        gated_cell.data_ptr(), gated_input.data_ptr(), out_gate.data_ptr())  # fmt: skip
        ctx.seq, ctx.t = seq, t
        ctx.save_for_backward(c_prev)
        ctx.set_materialize_grads(False)  # an unused output gets no zeros (see backward)
        return gated_cell, gated_input, out_gate, c_prev.new_empty(0)

    @staticmethod
    def backward(ctx, d_gated_cell, d_gated_input, d_out_gate, _d_link):
        _refuse_double_backward(d_gated_cell, d_gated_input, d_out_gate)
        (c_prev,) = ctx.saved_tensors
        seq, t, rows = ctx.seq, ctx.t, c_prev.shape[0]
        grads = [_grad(g, c_prev) for g in (d_gated_cell, d_gated_input)]
        d_o = None  # the o gradient is in dz already, from this step's _Transition or _Output
        if d_out_gate is not None or not seq.output_reached[t]:
            d_o = _grad(d_out_gate, c_prev)  # held here until the kernel has read it
        dc_prev, dh_prev = torch.empty_like(c_prev), torch.empty_like(c_prev)
        seq.outer_gates_backward(rows, seq.hidden, seq.gate, seq.candidate, seq.w_hh.handle,
                                 seq.z(t), c_prev.data_ptr(), *(g.data_ptr() for g in grads),
                                 0 if d_o is None else d_o.data_ptr(),
                                 seq.dz_at_step(t), dc_prev.data_ptr(), dh_prev.data_ptr())  # fmt: skip
        seq.reached[t] = True
        return c_prev.new_empty(0), dh_prev, dc_prev, None, None


class _Transition(torch.autograd.Function):
    """The new cell c_t of step t, every row active, and the link from the step before -> h_t,
    the next step's ``f * c_t`` and ``i * g`` (its ``_GatesStep`` and this step's output in one
    node and one kernel call), and a link to the next step."""

    @staticmethod
    def forward(ctx, seq: _Sequence, cell, _link, t: int, t_next: int):
        cell = cell.contiguous()
        h, gated_cell, gated_input = (torch.empty_like(cell) for _ in range(3))
        h_copy = seq.h_prev_ptr + t_next * seq.state_stride  # the next step's h_{t-1}
        seq.outer_transition(seq.batch, seq.hidden, seq.gate, seq.candidate, seq.cell,
                             seq.w_hh_t.handle, seq.z(t), cell.data_ptr(), seq.act(t),
                             h.data_ptr(), h_copy, seq.z(t_next), gated_cell.data_ptr(),
                             gated_input.data_ptr())  # fmt: skip
        ctx.seq, ctx.t, ctx.t_next = seq, t, t_next
        ctx.save_for_backward(cell)
        ctx.set_materialize_grads(False)
        return h, gated_cell, gated_input, cell.new_empty(0)

    @staticmethod
    def backward(ctx, d_h, d_gated_cell, d_gated_input, _d_link):
        _refuse_double_backward(d_h, d_gated_cell, d_gated_input)
        (cell,) = ctx.saved_tensors
        seq, t, t_next = ctx.seq, ctx.t, ctx.t_next
        grads = [_grad(g, cell) for g in (d_h, d_gated_cell, d_gated_input)]
        d_cell = torch.empty_like(cell)
        if not seq.output_reached[t_next]:  # the next step's h fed nothing the loss used
            seq.dz[t_next, :, 3 * seq.hidden :].zero_()
        seq.outer_transition_backward(seq.batch, seq.hidden, seq.gate, seq.candidate, seq.cell,
                                      seq.w_hh.handle, seq.z(t), seq.act(t), seq.z(t_next),
                                      cell.data_ptr(), *(g.data_ptr() for g in grads),
                                      seq.dz_at_step(t), seq.dz_at_step(t_next), d_cell.data_ptr(),
                                      seq.scratch.data_ptr())  # fmt: skip
        seq.reached[t_next] = seq.output_reached[t] = True
        return None, d_cell, cell.new_empty(0), None, None


class _Output(torch.autograd.Function):
    """The last step's new cell, every row active, and the link from the step before -> its h."""

    @staticmethod
    def forward(ctx, seq: _Sequence, cell, _link, t: int):
        cell = cell.contiguous()
        h = torch.empty_like(cell)
        seq.outer_output(seq.batch, seq.hidden, seq.cell, seq.z(t), cell.data_ptr(), seq.act(t),
                         h.data_ptr())  # fmt: skip
        ctx.seq, ctx.t = seq, t
        return h

    @staticmethod
    def backward(ctx, d_h):
        _refuse_double_backward(d_h)
        seq, t = ctx.seq, ctx.t
        d_h = d_h.clone(memory_format=torch.contiguous_format)  # the kernel overwrites it
        d_cell = torch.empty_like(d_h)
        seq.outer_output_backward(seq.batch, seq.hidden, seq.cell, seq.z(t), seq.act(t),
                                  d_h.data_ptr(), seq.dz_at_step(t), d_cell.data_ptr())  # fmt: skip
        seq.output_reached[t] = True
        return None, d_cell, d_cell.new_empty(0), None


def _refuse_double_backward(*grads: Tensor | None) -> None:
    """The nodes' backward is not differentiable: refuse to build a graph through it (as the
    native nodes do)."""
    if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
        raise RuntimeError(
            "the outer LSTM's step nodes have no second derivative (a backward with "
            "create_graph=True through a memory function on the generic path)"
        )


def _grad(grad: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous gradient (autograd passes None for an output nothing used)."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _check_memory_output(memory: MemoryFunction, cell: Tensor, state, like: Tensor) -> None:
    """The next step's C function reads the cell as raw memory: check it first."""
    if (
        cell.shape != like.shape
        or cell.dtype != like.dtype
        or cell.device != like.device
        or len(state) != memory.num_states
    ):
        raise RuntimeError(
            f"{type(memory).__name__} returned a cell of shape {tuple(cell.shape)}, dtype "
            f"{cell.dtype} on {cell.device} with {len(state)} state tensors; expected "
            f"{tuple(like.shape)}, {like.dtype} on {like.device} and num_states={memory.num_states}"
        )


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
    packed = min(sizes, default=batch) < batch
    if steps == 0:
        return x.new_zeros(0, batch, h0.shape[1]), h0, c0
    seq = _Sequence(x, weights, candidate_activation, packed)
    token = _Prologue.apply(seq, x, *weights)
    loop = _packed_loop if packed else _dense_loop
    h, cells, outputs = loop(seq, token, memory, h0, c0, sizes, reverse)
    return torch.stack(outputs), h, torch.stack(cells)


def _dense_loop(seq, token, memory, h0, c0, sizes, reverse):
    """The time loop when every row is active at every step: per step, the memory function and
    one node of ours (its output and the next step's gates)."""
    order = list(time_order(len(sizes), reverse))
    outputs: list[Tensor] = [h0.new_empty(0)] * len(sizes)
    cells = tuple(c0.unbind(0))
    gated_cell, gated_input, _, link = _GatesStep.apply(token, h0, cells[0], seq, order[0])
    state = cells[1:]
    if seq.nodes is not None:
        nodes = native_nodes.module()
        transition = functools.partial(nodes.transition, seq.nodes)
        output = functools.partial(nodes.output, seq.nodes)
    else:
        transition = functools.partial(_Transition.apply, seq)
        output = functools.partial(_Output.apply, seq)
    for n, t in enumerate(order):
        cell, state = memory(gated_cell, gated_input, state)
        _check_memory_output(memory, cell, state, gated_cell)
        if n + 1 < len(order):
            h, gated_cell, gated_input, link = transition(cell, link, t, order[n + 1])
        else:
            h = output(cell, link, t)
        outputs[t] = h
    return h, (cell, *state), outputs


def _packed_loop(seq, token, memory, h0, c0, sizes, reverse):
    """The time loop of a packed batch: the active rows change from step to step, and the rows
    beyond them keep their state."""
    steps = len(sizes)
    h, cells = h0, tuple(c0.unbind(0))
    outputs: list[Tensor] = [h0.new_empty(0)] * steps
    for t in time_order(steps, reverse):
        rows = sizes[t]
        if rows == 0:
            outputs[t] = h.new_zeros(h.shape)
            continue
        h_active, cells_active = active_rows(h, cells, rows)
        gated_cell, gated_input, out_gate, _ = _GatesStep.apply(
            token, h_active, cells_active[0], seq, t
        )
        cell, state = memory(gated_cell, gated_input, cells_active[1:])
        _check_memory_output(memory, cell, state, gated_cell)
        h, cells, outputs[t] = merge_rows(h, cells, out_gate * torch.tanh(cell), (cell, *state))
    return h, cells, outputs


_COMPILED: weakref.WeakKeyDictionary[MemoryFunction, Any] = weakref.WeakKeyDictionary()


def compiled_step(memory: MemoryFunction):
    """``torch.compile`` of the memory function's step, made once per memory function."""
    if memory not in _COMPILED:
        _COMPILED[memory] = torch.compile(memory)
    return _COMPILED[memory]
