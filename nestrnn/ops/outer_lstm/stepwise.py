"""The outer LSTM around any memory function, with the outer LSTM's own work fused.

Only the memory function's step goes through autograd; the outer LSTM's work is done by hand, in
the C kernel, as in the whole-sequence op:

* ``_Prologue``: the input projection of every step is one GEMM; in the backward (which autograd
  runs after every step's, since every step consumes its output ``token``) the gradients of every
  outer weight are a few large GEMMs over all steps, from the gate gradients ``dz`` the steps left
  in a shared buffer;
* ``_GatesStep``: the first step's gates: ``z += h_{t-1} W_hh^T + b`` (MKL's packed GEMM, the
  weight packed once per call), the gate activations and the two inputs of the memory function,
  ``f * c_{t-1}`` and ``i * g``; its backward writes the gate gradients into ``dz`` and returns
  those of h_{t-1} and c_{t-1};
* the native (C++) nodes of ``native_nodes.py``: ``transition``, what lies between two memory
  calls, in one node and one kernel call: this step's ``h_t = o * tanh(c_t)``, written into the
  output (T, B, H), and the next step's gates from it; ``output``, the last step's h, and the
  output as one tensor.

Where the outer weights are small (``fuses_input``), the steps' GEMMs take the input too, while
it is in cache: ``z_t = [x_t | h_{t-1}] [W_ih | W_hh]^T`` in the forward, instead of the
prologue's GEMM, and ``dz_t [W_hh | W_ih]`` gives the gradients of h_{t-1} and x_t in the
backward. A small GEMM costs little more for twice the width, while the weight stays in cache.

Each of these nodes also takes a ``link`` tensor from the step before and gives one to the next:
h_t depends on the step's gates whatever the memory function does with its inputs, so the
backward must reach every earlier step (and the prologue) even from a memory function that
detaches them, or ignores them. A link has the output's shape and no memory (zero strides): the
output's gradient, which the ``output`` node's backward receives, goes down the links to every step, so
that no step needs a gradient tensor of its own, and none is kept from one backward to the next.

Autograd then runs one backward pass over the whole sequence: one node of ours per step besides
the memory function's, instead of the ~20 small ops of the naive path, and no weight gradient
inside the loop. A packed batch, whose active rows change from step to step, keeps ``_GatesStep``
at every step and computes h with plain autograd (``_step_loop``); so does every batch where the
native nodes cannot be built (no C++ compiler or Python headers, ``NESTRNN_NATIVE_NODES=0``),
still several times the naive path's speed (docs/design.md §7). This path runs on CPU in float32 and float64 when the CPU kernel is
available (see ``applies``); shapes as in ``naive.py``, without a projection.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.autograd import forward_ad

from nestrnn.activations import activation_code
from nestrnn.ops.common import native
from nestrnn.ops.common.gradients import input_gradient
from nestrnn.ops.common.levels import LevelWeights, time_order
from nestrnn.ops.common.workspace import WORKSPACE
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
        and x.shape[1] > 0  # the kernel needs rows; the naive path handles an empty batch
        and x.dtype in DTYPES
        and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
        # the kernel reads memory: a tensor subclass (FakeTensorMode's, for shape-only tooling)
        # may have none, and runs the naive path, which any subclass can follow
        and all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)
        # torch.func's wrappers hide their memory too, and the nodes have no forward-mode AD
        and not torch._C._are_functorch_transforms_active()
        and all(forward_ad.unpack_dual(t).tangent is None for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and native.kernel() is not None
    )


class _Sequence:
    """What the steps of one call share: the gate buffer ``gates`` (T, B, 4H), which holds the
    input projection (unless the steps do it), then each step's activated gates; the input of
    each step's GEMM, ``xh``, which the weight gradients read: (T, B, I + H) = [x_t | h_{t-1}]
    where the steps do the input projection, else (T, B, H) = h_{t-1}; ``act_cells`` (T, B, H),
    tanh of each new cell; ``dz`` (T, B, 4H) and ``db`` (T, 4H), the gate and bias gradients the
    steps' backwards leave for the prologue's; and where the steps
    compute x's gradient, that gradient (T, B, I), which the prologue's backward takes
    (``take_dx``). The steps address them by pointer arithmetic (``z`` and the like): a view
    costs about a microsecond, a step tens."""

    # the C step functions, set in __init__ by name (kernel.step_function)
    outer_gates: Callable[..., Any]
    outer_transition: Callable[..., Any]
    outer_output: Callable[..., Any]

    def __init__(self, x: Tensor, weights: LevelWeights, candidate: str, packed: bool):
        steps, batch, in_size = x.shape
        hidden = weights.weight_hh.shape[1]
        self.hidden, self.batch, self.packed = hidden, batch, packed
        grad = torch.is_grad_enabled()
        self.fused = fuses_input(weights.weight_ih)
        self.in_fwd = in_size if self.fused else 0  # the x columns of xh
        self.input_grad = grad and x.requires_grad and self.fused
        self.in_size = in_size if self.input_grad else 0
        # b_ih + b_hh, which the steps add to the gates, and whether they write its gradient
        bias = weights.combined_bias()
        self.bias = None if bias is None else bias.detach().contiguous()
        self.bias_grad = grad and any(
            b is not None and b.requires_grad for b in (weights.bias_ih, weights.bias_hh)
        )
        self.gate, self.candidate = activation_code("sigmoid"), activation_code(candidate)
        self.cell = activation_code("tanh")
        # buffers from the pool: fresh memory would page-fault on its first touch, every call;
        # rows of a packed batch that are inactive at a step must read zero in xh and dz
        new = WORKSPACE.zeros if packed else WORKSPACE.empty
        dtype, device = x.dtype, x.device
        self.gates = WORKSPACE.empty((steps, batch, 4 * hidden), dtype, device)
        self.xh = new((steps, batch, self.in_fwd + hidden), dtype, device)
        self.x = x.detach().contiguous() if self.fused else None
        self.state_shape = (steps, batch, hidden)
        self.dz = new((steps, batch, 4 * hidden), dtype, device)
        self.act_cells = WORKSPACE.empty((steps, batch, hidden), dtype, device)
        # each step's bias gradient (T, 4H)
        self.db = WORKSPACE.empty((steps, 4 * hidden), dtype, device) if self.bias_grad else None
        # (B, H + I) for the gates' backward GEMM (the kernel's "wide")
        self.scratch = x.new_empty(batch, hidden + self.in_size)
        self._dx: Tensor | None = None
        # per step, whether a backward wrote its gate gradients into dz (the others' must be 0),
        # and whether one wrote the o gradient of its output (else the gates' backward takes 0):
        # bytes that the native nodes share, seen here through ctypes views
        self.flags = torch.zeros(2, steps, dtype=torch.uint8)
        view = ctypes.c_uint8 * steps
        self.reached = view.from_address(self.flags.data_ptr())
        self.output_reached = view.from_address(self.flags[1].data_ptr())
        self.gates_ptr, self.dz_ptr = self.gates.data_ptr(), self.dz.data_ptr()
        self.stride = batch * 4 * hidden * x.element_size()  # bytes from one step to the next
        self.input_stride = batch * in_size * x.element_size()
        self.xh_stride = batch * (self.in_fwd + hidden) * x.element_size()
        self.wide = self.scratch.data_ptr()
        self.bias_ptr = 0 if self.bias is None else self.bias.data_ptr()
        self.db_ptr = 0 if self.db is None else self.db.data_ptr()
        kernel = cast(native.Kernel, native.kernel())  # the caller checked it is there
        w_hh, w_ih = weights.weight_hh.detach().contiguous(), weights.weight_ih.detach()
        w_fwd = torch.cat([w_ih, w_hh], 1) if self.fused else w_hh
        w_back = torch.cat([w_hh, w_ih], 1) if self.input_grad else w_hh
        self.w_fwd = kernel.matrix(w_fwd, transposed=True, rows=batch)  # xh [W_ih | W_hh]^T
        self.w_back = kernel.matrix(w_back, transposed=False, rows=batch)  # dz [W_hh | W_ih]
        self.outer_gates = kernel.step_function("outer_gates", x.dtype)
        self.outer_gates_backward = kernel.step_function("outer_gates_backward", x.dtype)
        self.nodes = None if packed else self._native_sequence(kernel, w_fwd, w_back)

    def _native_sequence(self, kernel: native.Kernel, w_fwd: Tensor, w_back: Tensor):
        """What the native nodes share (they own the weight matrices and the output from then
        on), or None when they are unavailable: then every step runs ``_GatesStep``."""
        nodes = native_nodes.module()
        if nodes is None:
            return None
        dtype = w_fwd.dtype
        output = self.gates.new_empty(self.state_shape)  # the steps write their h into it
        functions = (
            "outer_transition",
            "outer_transition_backward",
            "outer_output",
            "outer_output_backward",
        )
        sequence = nodes.Sequence(
            self.gates,
            self.dz,
            self.xh,
            self.act_cells,
            output,
            self.flags,
            self.bias,
            self.db,
            self.x,
            self.in_size,
            w_fwd,
            w_back,
            self.w_fwd.handle,
            self.w_back.handle,
            kernel.matrix_free_address(dtype),
            (self.gate, self.candidate, self.cell),
            tuple(kernel.step_address(name, dtype) for name in functions),
        )
        self.w_fwd.release()
        self.w_back.release()
        return sequence

    def link(self) -> Tensor:
        """A link between two steps' nodes: the output's shape, no memory."""
        return self.gates.new_empty_strided(self.state_shape, (0, 0, 0))

    def z(self, t: int) -> int:
        """Address of step t's gates."""
        return self.gates_ptr + t * self.stride

    def dz_at_step(self, t: int) -> int:
        """Address of step t's gate gradients."""
        return self.dz_ptr + t * self.stride

    def x_at(self, t: int) -> int:
        """Address of x_t where the steps do the input projection, else 0."""
        return cast(Tensor, self.x).data_ptr() + t * self.input_stride if self.fused else 0

    def xh_at(self, t: int) -> int:
        """Address of step t's GEMM input."""
        return self.xh.data_ptr() + t * self.xh_stride

    def db_at(self, t: int) -> int:
        """Address of step t's bias gradient, or 0 where the bias needs none."""
        return self.db_ptr and self.db_ptr + t * 4 * self.hidden * self.gates.element_size()

    def dx_at(self, t: int) -> int:
        """Address of step t's input gradient (made on first use), or 0 where x needs none."""
        if not self.input_grad:
            return 0
        if self.nodes is not None:
            return self.nodes.input_grad().data_ptr() + t * self.input_stride
        if self._dx is None:  # rows inactive at a step of a packed batch must read zero
            new = self.gates.new_zeros if self.packed else self.gates.new_empty
            self._dx = new(*self.state_shape[:2], self.in_size)
        return self._dx.data_ptr() + t * self.input_stride

    def take_dx(self) -> Tensor:
        """The input gradient the steps' backwards wrote; the next backward makes a new one (the
        one returned is the caller's)."""
        self.dx_at(0)  # where no step's backward made it yet
        if self.nodes is not None:
            return self.nodes.take_input_grad()
        dx, self._dx = self._dx, None
        return cast(Tensor, dx)


class _Prologue(torch.autograd.Function):
    """x, W_ih, W_hh, b_ih, b_hh -> ``token`` (no data): the input projection of every step
    (without the bias, which the steps add) goes into the shared gate buffer, unless the steps do
    it; the backward returns every outer parameter gradient and that of x."""

    @staticmethod
    def forward(ctx, seq: _Sequence, x, w_ih, w_hh, b_ih, b_hh):
        steps, batch, in_size = x.shape
        if not seq.fused:
            torch.mm(x.reshape(-1, in_size), w_ih.t(), out=seq.gates.view(steps * batch, -1))
        ctx.seq, ctx.has_bias = seq, (b_ih is not None, b_hh is not None)
        ctx.save_for_backward(x, w_ih)
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        x, w_ih = ctx.saved_tensors
        seq = ctx.seq
        steps, batch, in_size = x.shape
        need_x, need_ih, need_hh, need_bih, need_bhh = ctx.needs_input_grad[1:]
        dx = seq.take_dx() if seq.input_grad else None
        for t, reached in enumerate(seq.reached):  # a loss that did not depend on every step
            if not reached:
                for per_step in (seq.dz, dx, seq.db):
                    if per_step is not None:
                        per_step[t].zero_()
        seq.flags.zero_()  # for a second backward through a retained graph
        dz = seq.dz.view(steps * batch, -1)
        if need_x and dx is None:
            dx = input_gradient(dz, w_ih).view(x.shape)
        # (X^T dz)^T rather than dz^T X: faster at small (B, H) such as (32, 75), equal at 256
        xh = seq.xh.view(steps * batch, -1)
        if seq.fused and need_ih and need_hh:  # both from one GEMM: [x | h_{t-1}]^T dz
            both = xh.t().mm(dz)
            dw_ih, dw_hh = both[:in_size].t().contiguous(), both[in_size:].t().contiguous()
        else:
            dw_ih = x.reshape(-1, in_size).t().mm(dz).t().contiguous() if need_ih else None
            h_prev = xh[:, seq.in_fwd :]
            dw_hh = h_prev.t().mm(dz).t().contiguous() if need_hh else None
        db = seq.db.sum(0) if need_bih or need_bhh else None
        d_bih = db if need_bih and ctx.has_bias[0] else None
        d_bhh = (db.clone() if d_bih is not None else db) if need_bhh and ctx.has_bias[1] else None
        return None, dx, dw_ih, dw_hh, d_bih, d_bhh


class _GatesStep(torch.autograd.Function):
    """(token, h_{t-1}, c_{t-1}) of the ``rows`` active rows -> ``f * c_{t-1}``, ``i * g``, ``o``
    and a link to the next step's node (the first step of a sequence, and every step of a packed
    batch)."""

    @staticmethod
    def forward(ctx, token, h_prev, c_prev, seq: _Sequence, t: int):
        rows = h_prev.shape[0]
        h_prev, c_prev = h_prev.contiguous(), c_prev.contiguous()
        gated_cell, gated_input, out_gate = (torch.empty_like(c_prev) for _ in range(3))
        seq.outer_gates(
            rows,
            seq.hidden,
            seq.gate,
            seq.candidate,
            seq.w_fwd.handle,
            seq.bias_ptr,
            seq.in_fwd,
            seq.x_at(t),
            h_prev.data_ptr(),
            seq.xh_at(t),
            seq.z(t),
            c_prev.data_ptr(),
            gated_cell.data_ptr(),
            gated_input.data_ptr(),
            out_gate.data_ptr(),
        )
        ctx.seq, ctx.t = seq, t
        ctx.save_for_backward(c_prev)
        ctx.set_materialize_grads(False)  # an unused output gets no zeros (see backward)
        return gated_cell, gated_input, out_gate, seq.link()

    @staticmethod
    def backward(ctx, d_gated_cell, d_gated_input, d_out_gate, _d_link):
        _refuse_double_backward(d_gated_cell, d_gated_input, d_out_gate)
        (c_prev,) = ctx.saved_tensors
        seq, t, rows = ctx.seq, ctx.t, c_prev.shape[0]
        grads = [_grad(g, c_prev) for g in (d_gated_cell, d_gated_input)]
        d_o = None  # the o gradient is in dz already, from this step's native transition or output
        if d_out_gate is not None or not seq.output_reached[t]:
            d_o = _grad(d_out_gate, c_prev)  # held here until the kernel has read it
        dc_prev, dh_prev = torch.empty_like(c_prev), torch.empty_like(c_prev)
        seq.outer_gates_backward(
            rows,
            seq.hidden,
            seq.gate,
            seq.candidate,
            seq.w_back.handle,
            seq.z(t),
            c_prev.data_ptr(),
            *(g.data_ptr() for g in grads),
            0 if d_o is None else d_o.data_ptr(),
            seq.dz_at_step(t),
            dc_prev.data_ptr(),
            dh_prev.data_ptr(),
            seq.db_at(t),
            seq.in_size,
            seq.dx_at(t),
            seq.wide,
        )
        seq.reached[t] = True
        return c_prev.new_empty(0), dh_prev, dc_prev, None, None


def _l2_cache_bytes() -> int:
    """This CPU's L2 cache per core (Linux sysfs: "1024K"), or 1 MiB where it does not say."""
    units = {"K": 1 << 10, "M": 1 << 20}
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return 1 << 20


L2_CACHE_BYTES = _l2_cache_bytes()


def fuses_input(weight_ih: Tensor) -> bool:
    """Whether the steps' GEMMs take the input too: ``[x_t | h_{t-1}] [W_ih | W_hh]^T`` in the
    forward and ``dz_t [W_hh | W_ih]`` in the backward, rather than one large GEMM over all steps
    before the loop (the input projection) and after it (x's gradient).

    A step's GEMM reads its (packed) weight every step: while that fits well inside the L2 cache
    the GEMM costs little more for twice the columns, but beyond it several times more. Measured
    on AMD EPYC (1 MiB L2), B = 32, us a step: forward 25 for (4H, I + H) = (300, 150) against
    15-19 for (300, 75) and 17 for the large GEMM's share; 78 for (400, 200) against 22 + 31;
    backward 24 against 15 + 26 at H = I = 75, but 99 against 31 + 43 at 128. So: where
    [W_ih | W_hh] takes at most a quarter of the L2 cache.
    """
    four_h, in_size = weight_ih.shape
    size = four_h * (four_h // 4 + in_size) * weight_ih.element_size()
    return size <= L2_CACHE_BYTES // 4


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
    loop = _step_loop if seq.nodes is None else _native_loop
    output, h, cells = loop(seq, token, memory, h0, c0, sizes, reverse)
    return output, h, torch.stack(cells)


def _native_loop(seq, token, memory, h0, c0, sizes, reverse):
    """The time loop when every row is active at every step and the native nodes are there: per
    step, the memory function and one native node (its output and the next step's gates)."""
    order = list(time_order(len(sizes), reverse))
    cells = tuple(c0.unbind(0))
    gated_cell, gated_input, _, link = _GatesStep.apply(token, h0, cells[0], seq, order[0])
    state = cells[1:]
    nodes = native_nodes.module()
    for n, t in enumerate(order):
        cell, state = memory(gated_cell, gated_input, state)
        _check_memory_output(memory, cell, state, gated_cell)
        if n + 1 < len(order):
            gated_cell, gated_input, link = nodes.transition(seq.nodes, cell, link, t, order[n + 1])
    out, h = nodes.output(seq.nodes, cell, link, order[-1])
    return out, h, (cell, *state)


def _step_loop(seq, token, memory, h0, c0, sizes, reverse):
    """The time loop of a packed batch (the active rows change from step to step, and the rows
    beyond them keep their state), and of any batch without the native nodes: per step,
    ``_GatesStep``, the memory function, and h through autograd."""
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
    return torch.stack(outputs), h, cells


_COMPILED: weakref.WeakKeyDictionary[MemoryFunction, Any] = weakref.WeakKeyDictionary()


def compiled_step(memory: MemoryFunction):
    """``torch.compile`` of the memory function's step, made once per memory function."""
    if memory not in _COMPILED:
        _COMPILED[memory] = torch.compile(memory)
    return _COMPILED[memory]
