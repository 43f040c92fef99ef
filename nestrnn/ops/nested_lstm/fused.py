"""Fast path for one direction of one Nested LSTM layer: one input GEMM, hand-written backward.

Same contract as ``naive.nested_lstm_naive`` (see its docstring for shapes and semantics):

    nested_lstm_fused(x (T, B, I), weights (D levels), h0 (B, H), c0 (D, B, H),
                      batch_sizes=None, reverse=False) -> output (T, B, H), h_n (B, H), c_n (D, B, H)

How it is fast (DESIGN.md section 4):

* depth 1 is exactly ``nn.LSTM``'s cell, so it calls torch's own whole-sequence kernel
  (``torch._VF.lstm``: oneDNN on CPU, cuDNN on CUDA); packed + reverse falls back to the path below;
* depth >= 2 (and depth 1 packed + reverse) runs a ``torch.autograd.Function`` with two phases
  around each time loop: the outer input projection ``x W_ih^T + b`` of every step is one GEMM
  before the forward loop, and every weight and bias gradient (and the gradient of ``x``) is a few
  large GEMMs after the backward loop, which computes state and gate gradients only;
* the time loops themselves come in two versions (``_TimeLoop``):
  - on CPU in float32/float64, a C kernel (``fused_native.py``, ``cpu_kernel.c``): per step the
    recurrent GEMMs through torch's BLAS (MKL's packed GEMM) and all pointwise math, one loop per
    level. At (B, H, T) = (32, 256, 100) it took a depth-2 forward from 1.6-1.7x the time of
    ``nn.LSTM(num_layers=2)`` to 1.0-1.2x (benchmarks/README.md);
  - everywhere else (CUDA without Triton, or no C compiler: ``NESTRNN_NATIVE=0`` forces it), the
    PyTorch loop in this module, described below;
* large CPU buffers are reused between calls (``_Workspace``): fresh memory page-faults on
  first touch, which cost ~15% of a depth-2 forward+backward at (B, H, T) = (32, 256, 100).

The PyTorch loop: the forward runs without autograd and writes activated gates, cells,
``tanh(c)`` and the nested inputs of every step into preallocated buffers (rings when no gradient
is needed); weights are permuted, split and transposed once per call, so every per-step GEMM has
a row-major right operand (``h @ W^T`` on the transposed view was 25-55% slower per step).

Layout of the PyTorch loop. Gates are kept in the internal order (o, i, f, g) so that one sigmoid
covers o, i, f. Every per-step quantity is its own contiguous block: the GEMMs write
``[o | i | f]`` (B, 3H) and ``g`` (B, H) separately, and cells, ``tanh(c)``, ``x~ = i*g`` and
``h~ = f*c_prev`` have buffers of their own. An earlier version kept one (B, 5H) row ``[o|i|f|g|c_prev]`` per step (one multiply for
``[i|f]*[g|c]``); its column slices made the elementwise ops 2-3x slower at B = 32, and the
contiguous layout measured 7-9% faster forward at (32, 256, 100) (one thread, CPU time), equal
forward+backward. Buffers are in time order: time ``t`` reads the state of slot ``t`` and writes
slot ``t+1`` (forward), or reads slot ``t+1`` and writes slot ``t`` (reverse), so outputs and
saved tensors need no flipping. Packed batches (active rows are a prefix) slice
``[:batch_sizes[t]]``; inactive rows copy their state forward and get zero gradient.

Measured and not used in the PyTorch loop: torch.compile of the per-step elementwise chain (33 s
to compile; the compiled call took 119 us against 55 us for the eager ops at B=32, H=256); MKL
packed weights through ``torch.ops.mkl._mkl_linear`` (10-20% faster GEMMs with two threads, but a
private op without ``out=`` or accumulation; the C kernel calls the packed GEMM directly).

bfloat16 / float16 inputs are computed in float32 on this path (GEMM accumulation, gates and the
cell state all in fp32) and cast back; depth 1 runs torch's own LSTM in the input dtype.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nestrnn.ops.nested_lstm.common import LevelWeights

__all__ = ["clear_workspace", "nested_lstm_fused", "nested_lstm_own"]

# out= variants of the pointwise backward ops: grad * y * (1 - y) and grad * (1 - y^2) in one
# kernel each (instead of three)
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_tanh_backward = torch.ops.aten.tanh_backward.grad_input

_LOW_PRECISION = (torch.bfloat16, torch.float16)
LOOPS = ("auto", "native", "torch")


# --------------------------------------------------------------------------------------------
# public entry point


def nested_lstm_fused(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer (see the module docstring).

    Returns ``(output (T, B, H), h_n (B, H), c_n (D, B, H))``.
    """
    _check_inputs(x, weights, h0, c0, batch_sizes)
    if len(weights) == 1 and _torch_lstm_applies(x, batch_sizes, reverse):
        return _torch_lstm(x, weights[0], h0, c0, batch_sizes, reverse)
    return nested_lstm_own(x, weights, h0, c0, batch_sizes, reverse)


def nested_lstm_own(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    loop: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The hand-written path for any depth (depth 1 included; used directly by tests/benchmarks).

    ``loop`` picks the time loop: ``"native"`` (the C kernel of ``fused_native``; CPU only, an
    error when it is unavailable), ``"torch"`` (this module's PyTorch loop, any device) or
    ``"auto"`` (native where it applies).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    dtype = x.dtype
    if dtype in _LOW_PRECISION:  # fp32 compute; the casts are differentiable
        x, h0, c0 = x.float(), h0.float(), c0.float()
        weights = [LevelWeights(*(None if w is None else w.float() for w in lw)) for lw in weights]
    _check_same_type(x, weights, h0, c0)  # the C kernel reads raw memory of x's dtype
    if x.shape[0] == 0:  # empty sequence: the state passes through
        out = x.new_zeros(0, x.shape[1], h0.shape[1])
        return out.to(dtype), h0.to(dtype), c0.to(dtype)
    sizes = None if batch_sizes is None else [int(b) for b in batch_sizes.tolist()]
    flat = [w for lw in weights for w in lw]
    tensors = [x, h0, c0, *(w for w in flat if w is not None)]
    path = _loop_for(x, loop)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, h_n, c_n = _FusedNestedLSTM.apply(path, x, h0, c0, sizes, reverse, *flat)
    else:
        with torch.no_grad():
            prep = path.prepare(weights, h0.shape[1], for_backward=False)
            out, h_n, c_n, _ = path.forward(x, prep, h0, c0, sizes, reverse, save=False)
    if dtype in _LOW_PRECISION:
        out, h_n, c_n = out.to(dtype), h_n.to(dtype), c_n.to(dtype)
    return out, h_n, c_n


class _TimeLoop(NamedTuple):
    """One implementation of the op's three phases (this module's PyTorch loop, or the C kernel
    of ``fused_native``); the autograd Function below runs either.

    prepare(weights, hidden, for_backward) -> prepared weights
    forward(x, prep, h0, c0, sizes, reverse, save) -> out, h_n, c_n, saved tensors (or None)
    backward(saved, x, prep, sizes, reverse, d_out, d_hn, d_cn, needs) -> gradients by name
    """

    prepare: Callable
    forward: Callable
    backward: Callable


def _loop_for(x: Tensor, loop: str) -> _TimeLoop:
    """The C kernel for float32/float64 CPU tensors when it is available (and not turned off by
    ``NESTRNN_NATIVE=0``), else the torch loop; ``loop`` forces one."""
    if loop == "torch" or (loop == "auto" and os.environ.get("NESTRNN_NATIVE") == "0"):
        return _TORCH_LOOP
    from nestrnn.ops.nested_lstm import fused_native, native

    if fused_native.applies(x):
        return _TimeLoop(fused_native.prepare, fused_native.forward, fused_native.backward)
    if loop == "native":
        why = native.status().reason if x.device.type == "cpu" else f"input on {x.device}"
        raise RuntimeError(f"the native CPU loop cannot run this input: {why}")
    return _TORCH_LOOP


def _check_same_type(x, weights, h0, c0) -> None:
    named = [("h0", h0), ("c0", c0)]
    for k, lw in enumerate(weights):
        named += [(f"level {k} {f}", w) for f, w in zip(LevelWeights._fields, lw) if w is not None]
    for name, t in named:
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                "the state and every weight must have the input's dtype and device"
            )


def _check_inputs(x, weights, h0, c0, batch_sizes) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (T, B, I), got shape {tuple(x.shape)}")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one level")
    steps, batch, _ = x.shape
    hidden = weights[0].weight_hh.shape[1]
    if h0.shape != (batch, hidden):
        raise ValueError(f"h0 must be {(batch, hidden)}, got {tuple(h0.shape)}")
    if c0.shape != (len(weights), batch, hidden):
        raise ValueError(f"c0 must be {(len(weights), batch, hidden)}, got {tuple(c0.shape)}")
    if batch_sizes is not None and batch_sizes.shape != (steps,):
        raise ValueError(f"batch_sizes must be ({steps},), got {tuple(batch_sizes.shape)}")


# --------------------------------------------------------------------------------------------
# depth 1: torch's own LSTM


def _torch_lstm_applies(x: Tensor, batch_sizes: Tensor | None, reverse: bool) -> bool:
    """torch.lstm covers unpacked input (either direction) and packed input in forward order
    whose rows all have at least one step (pack_padded_sequence needs lengths >= 1)."""
    if batch_sizes is None:
        return x.shape[0] > 0
    return not reverse and x.shape[0] > 0 and int(batch_sizes[0]) == x.shape[1]


def _torch_lstm(x, w: LevelWeights, h0, c0, batch_sizes, reverse):
    """Depth 1 is nn.LSTM's cell: run torch's whole-sequence LSTM (what nn.LSTM itself calls)."""
    has_bias = w.bias_ih is not None or w.bias_hh is not None
    params = [w.weight_ih, w.weight_hh]
    if has_bias:  # a lone missing bias is a zero bias
        zero = w.weight_hh.new_zeros(w.weight_hh.shape[0])
        params += [zero if b is None else b for b in (w.bias_ih, w.bias_hh)]
    hx = (h0.unsqueeze(0), c0)
    train = torch.is_grad_enabled()
    if batch_sizes is None:
        xs = x.flip(0) if reverse else x
        out, h_n, c_n = torch._VF.lstm(xs, hx, params, has_bias, 1, 0.0, train, False, False)
        return (out.flip(0) if reverse else out), h_n[0], c_n
    steps, batch = x.shape[0], x.shape[1]
    lengths = (batch_sizes.unsqueeze(1) > torch.arange(batch)).sum(0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
    data, h_n, c_n = torch._VF.lstm(
        packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, train, False
    )
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes), total_length=steps
    )
    return out, h_n[0], c_n


# --------------------------------------------------------------------------------------------
# weights in the internal gate order


class _Prepared(NamedTuple):
    """Weights of all levels, split and permuted once per call (H = hidden size).

    Forward: every per-step GEMM has a row-major right operand ``W^T`` (``x @ W.t()`` on the
    transposed view was 25-55% slower per step) and writes one contiguous block: the sigmoid
    gates ``[o | i | f]`` (N = 3H) or the candidate ``g`` (N = H). A nested level reads its two
    inputs from separate buffers, so it is two accumulating GEMMs per block (K = H each).
    Backward: ``dz @ W`` with the (4H, K) matrices in the order (o, i, f, g).
    """

    w_ih0_s: Tensor  # (3H, I)  outer input weights of o, i, f (x-projection: x @ w.t())
    w_ih0_g: Tensor  # (H, I)   ... of g
    bias0_s: Tensor | None  # (3H,)  b_ih + b_hh of the outer level, o, i, f
    bias0_g: Tensor | None  # (H,)
    w_hh0_s_t: Tensor  # (H, 3H)  outer recurrent weights of o, i, f, transposed
    w_hh0_g_t: Tensor  # (H, H)
    # nested level k >= 1 (index 0 unused): transposed (H, 3H) / (H, H) weights acting on
    # x~ = i*g (ih) and h~ = f*c (hh), and the summed biases
    w_s_t: list[tuple[Tensor, Tensor] | None]
    w_g_t: list[tuple[Tensor, Tensor] | None]
    bias_s: list[Tensor | None]
    bias_g: list[Tensor | None]
    # backward only (None otherwise): (4H, K) in the order (o, i, f, g)
    w_ih0: Tensor | None  # (4H, I)
    w_hh0: Tensor | None  # (4H, H)
    w_in: list[tuple[Tensor, Tensor] | None]  # level k >= 1: (W_ih, W_hh), each (4H, H)


def _internal(w: Tensor, hidden: int, out: Tensor | None = None) -> Tensor:
    """(4H, ...) rows (i, f, g, o) -> rows (o, i, f, g), copied into ``out`` (or a new tensor)."""
    if out is None:
        return w.roll(hidden, 0)
    out[:hidden].copy_(w[3 * hidden :])
    out[hidden:].copy_(w[: 3 * hidden])
    return out


def _external(w: Tensor, hidden: int) -> Tensor:
    """Rows (o, i, f, g) -> (i, f, g, o): inverse of ``_internal``."""
    return w.roll(-hidden, 0)


def _sig_rows(w: Tensor, hidden: int) -> Tensor:
    """Rows (o, i, f) of a (4H, ...) tensor in nn.LSTM's order (one copy)."""
    return torch.cat([w[3 * hidden :], w[: 2 * hidden]])


def _transposed(w: Tensor, hidden: int, new) -> tuple[Tensor, Tensor]:
    """(4H, K) -> contiguous (K, 3H) for o, i, f and (K, H) for g."""
    s_t, g_t = new(w.shape[1], 3 * hidden), new(w.shape[1], hidden)
    s_t[:, :hidden].copy_(w[3 * hidden :].t())
    s_t[:, hidden:].copy_(w[: 2 * hidden].t())
    g_t.copy_(w[2 * hidden : 3 * hidden].t())
    return s_t, g_t


def _summed_bias(b_ih: Tensor | None, b_hh: Tensor | None, hidden: int) -> Tensor | None:
    """b_ih + b_hh (4H,) in the internal gate order; None without biases."""
    b = b_hh if b_ih is None else (b_ih if b_hh is None else b_ih + b_hh)
    return None if b is None else _internal(b, hidden)


def _bias_parts(b_ih: Tensor | None, b_hh: Tensor | None, hidden: int):
    """b_ih + b_hh split into (o, i, f) and g; (None, None) without biases."""
    b = _summed_bias(b_ih, b_hh, hidden)
    return (None, None) if b is None else (b[: 3 * hidden], b[3 * hidden :])


def _prepare_weights(weights: list[LevelWeights], hidden: int, for_backward: bool) -> _Prepared:
    """Split, permute and transpose every level's weights once per call; sum the two biases.

    The copies go to pooled buffers: fresh ones would page-fault on every call.
    """
    H = hidden
    w_ih0, w_hh0, b_ih0, b_hh0 = weights[0]
    dtype, device = w_hh0.dtype, w_hh0.device

    def new(*shape):
        return _WORKSPACE.empty(shape, dtype, device)

    w_s_t: list[tuple[Tensor, Tensor] | None] = [None]
    w_g_t: list[tuple[Tensor, Tensor] | None] = [None]
    bias_s: list[Tensor | None] = [None]
    bias_g: list[Tensor | None] = [None]
    w_in: list[tuple[Tensor, Tensor] | None] = [None]
    for w_ih, w_hh, b_ih, b_hh in weights[1:]:
        (ih_s, ih_g), (hh_s, hh_g) = _transposed(w_ih, H, new), _transposed(w_hh, H, new)
        w_s_t.append((ih_s, hh_s))
        w_g_t.append((ih_g, hh_g))
        b_s, b_g = _bias_parts(b_ih, b_hh, H)
        bias_s.append(b_s)
        bias_g.append(b_g)
        if for_backward:
            w_in.append((_internal(w_ih, H, new(4 * H, H)), _internal(w_hh, H, new(4 * H, H))))
    hh0_s_t, hh0_g_t = _transposed(w_hh0, H, new)
    bias0_s, bias0_g = _bias_parts(b_ih0, b_hh0, H)
    return _Prepared(
        w_ih0_s=_sig_rows(w_ih0, H),
        w_ih0_g=w_ih0[2 * H : 3 * H],
        bias0_s=bias0_s,
        bias0_g=bias0_g,
        w_hh0_s_t=hh0_s_t,
        w_hh0_g_t=hh0_g_t,
        w_s_t=w_s_t,
        w_g_t=w_g_t,
        bias_s=bias_s,
        bias_g=bias_g,
        w_ih0=_internal(w_ih0, H, new(*w_ih0.shape)) if for_backward else None,
        w_hh0=_internal(w_hh0, H, new(4 * H, H)) if for_backward else None,
        w_in=w_in if for_backward else [None] * len(weights),
    )


# --------------------------------------------------------------------------------------------
# workspace reuse


class _Workspace:
    """Reuses the large internal CPU buffers (gates, cells, gate gradients) across calls.

    Fresh memory from the system costs a page fault on first touch: measured 2.4 GB/s here,
    against ~10 GB/s for touching warm memory, which was ~15% of a depth-2 forward+backward at
    (B, H, T) = (32, 256, 100). PyTorch does not cache CPU memory, so the op keeps its own buffers:
    a buffer is handed out again only when nothing but this pool references its storage (the
    autograd graph that saved it has been freed). Never used for tensors returned to the caller.
    Up to ``NESTRNN_WORKSPACE_MB`` (default 2048; 0 disables) is kept; ``clear_workspace()``
    releases it. CUDA has its own caching allocator and is not pooled.
    """

    min_bytes = 1 << 17  # smaller buffers come from malloc's heap, already warm

    def __init__(self) -> None:
        self.max_bytes = int(os.environ.get("NESTRNN_WORKSPACE_MB", "2048")) << 20
        self._buffers: list[Tensor] = []
        self._lock = threading.Lock()
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        self._use_count = use_count
        self._free_count = None if use_count is None else self._count(torch.empty(1))

    def _count(self, t: Tensor) -> int:
        return self._use_count(t.untyped_storage()._cdata)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of ``shape`` with undefined contents (pooled when large and on CPU)."""
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if (
            device.type != "cpu"
            or self._free_count is None
            or nbytes < self.min_bytes
            or nbytes > self.max_bytes
        ):
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            best = None
            for buf in self._buffers:  # the smallest free buffer that fits without much waste
                size = buf.numel()
                fits = buf.dtype == dtype and numel <= size <= 2 * numel
                smaller = best is None or size < best.numel()
                if fits and smaller and self._count(buf) == self._free_count:
                    best = buf
            if best is None:
                with torch.inference_mode(False):  # usable later in training, too
                    best = torch.empty(numel, dtype=dtype)
                self._buffers.append(best)
                self._trim()
            return best[:numel].view(shape)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.empty(shape, dtype, device).zero_()

    def _trim(self) -> None:
        """Forget the oldest buffers beyond the byte limit (ones in use are freed by their users)."""
        total = sum(b.numel() * b.element_size() for b in self._buffers)
        while total > self.max_bytes and len(self._buffers) > 1:
            old = self._buffers.pop(0)
            total -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


_WORKSPACE = _Workspace()


def clear_workspace() -> None:
    """Release the CPU buffers the fused op keeps for reuse between calls."""
    _WORKSPACE.clear()


# --------------------------------------------------------------------------------------------
# buffers and per-step views


def _views(buf: Tensor, count: int) -> list[Tensor]:
    """Per-slot views of ``buf`` (n, ...) for slots 0..count-1; a ring when n < count.

    ``unbind`` makes all views in one call: slicing inside the step loop costs ~2 us a view.
    """
    parts = buf.unbind(0)
    return list(parts) if len(parts) == count else [parts[j % len(parts)] for j in range(count)]


def _rows(t: Tensor, rows: int | None) -> Tensor:
    """The active prefix of a (B, ...) tensor; ``rows`` None means all rows."""
    return t if rows is None else t[:rows]


class _LevelBuffers(NamedTuple):
    """One level's forward buffers (B = batch, H = hidden, n = T or 1 when nothing is saved).

    Each per-step quantity is its own contiguous (B, H) or (B, 3H) block: elementwise ops that
    write a column slice of a wider row-major buffer measured 2-3x slower at B = 32 (and strided
    tanh 3x slower again with two threads).
    """

    sig: Tensor  # (n, B, 3H) activated o, i, f of each step
    cand: Tensor  # (n, B, H) candidate g: tanh, or the identity at the outer level when nested
    cell: Tensor  # (T+1 or 2, B, H) the level's cell before each step, indexed by slot
    tanh_c: Tensor  # (n, B, H) tanh of the new cell
    gin: Tensor | None  # (n, B, H) i*g = x~ of the next level (None at the innermost level)
    gcell: Tensor | None  # (n, B, H) f*c_prev = h~ of the next level


class _LevelViews:
    """Per-step views of one level's buffers, each list built on first use."""

    def __init__(self, bufs: _LevelBuffers, steps: int, hidden: int):
        self.bufs, self.steps, self.H = bufs, steps, hidden

    def _sig_cols(self, start: int, stop: int) -> list[Tensor]:
        return _views(self.bufs.sig[..., start * self.H : stop * self.H], self.steps)

    @cached_property
    def sig(self):  # (B, 3H) [o | i | f]
        return _views(self.bufs.sig, self.steps)

    @cached_property
    def o(self):
        return self._sig_cols(0, 1)

    @cached_property
    def i(self):
        return self._sig_cols(1, 2)

    @cached_property
    def f(self):
        return self._sig_cols(2, 3)

    @cached_property
    def cand(self):
        return _views(self.bufs.cand, self.steps)

    @cached_property
    def cell(self):  # by slot: T+1 entries
        return _views(self.bufs.cell, self.steps + 1)

    @cached_property
    def tanh_c(self):
        return _views(self.bufs.tanh_c, self.steps)

    @cached_property
    def gin(self):
        return _views(self.bufs.gin, self.steps)

    @cached_property
    def gcell(self):
        return _views(self.bufs.gcell, self.steps)


class _GradViews:
    """Per-step views into one level's gate-gradient buffer (T, B, 4H) laid out [o | i | f | g]
    (one row-major block per step, so that ``dz @ W`` is one GEMM)."""

    def __init__(self, buf: Tensor, hidden: int):
        self.buf, self.steps, self.H = buf, buf.shape[0], hidden

    def _cols(self, start: int, stop: int) -> list[Tensor]:
        return _views(self.buf[..., start * self.H : stop * self.H], self.steps)

    @cached_property
    def z(self):
        return _views(self.buf, self.steps)

    @cached_property
    def sig(self):
        return self._cols(0, 3)

    @cached_property
    def o(self):
        return self._cols(0, 1)

    @cached_property
    def i(self):
        return self._cols(1, 2)

    @cached_property
    def f(self):
        return self._cols(2, 3)

    @cached_property
    def cand(self):
        return self._cols(3, 4)


# --------------------------------------------------------------------------------------------
# forward


class _Saved(NamedTuple):
    """What the backward needs from the forward (all buffers in time order)."""

    levels: list[_LevelBuffers]
    h_store: Tensor  # unpacked: the output (T, B, H); packed: every slot's h (T+1, B, H)
    h_init: Tensor | None  # unpacked: h0 (1, B, H); packed: None (it is in h_store)

    def tensors(self) -> list[Tensor | None]:
        return [self.h_store, self.h_init, *(t for lv in self.levels for t in lv)]

    @classmethod
    def from_tensors(cls, tensors) -> _Saved:
        size = len(_LevelBuffers._fields)
        rest = tensors[2:]
        levels = [_LevelBuffers(*rest[i : i + size]) for i in range(0, len(rest), size)]
        return cls(levels, tensors[0], tensors[1])


def _h_slots(steps, batch, hidden, packed, dtype, device) -> tuple[Tensor, Tensor | None]:
    """Storage of h for every slot, as ``(h_store, h_init)``.

    Unpacked: the slots are the output tensor itself (so the output is not a view, and users may
    modify it in place) plus h0 (1, B, H). Packed: one pooled (T+1, B, H) buffer and None, since
    inactive rows carry state there while the output must show zeros.
    """
    if packed:
        return _WORKSPACE.empty((steps + 1, batch, hidden), dtype, device), None
    h_store = torch.empty(steps, batch, hidden, dtype=dtype, device=device)  # not pooled
    return h_store, torch.empty(1, batch, hidden, dtype=dtype, device=device)


def _h_slot_list(h_store, h_init, reverse) -> list[Tensor]:
    """The T+1 slots of h as (B, H) views, in slot order (see ``_h_slots``)."""
    hs = list(h_store.unbind(0))
    if h_init is None:
        return hs
    return [*hs, h_init[0]] if reverse else [h_init[0], *hs]


def _packed_output(h_store: Tensor, sizes: list[int], reverse: bool) -> Tensor:
    """The output (T, B, H) from a packed (T+1, B, H) h store: inactive rows are zero."""
    steps, batch = h_store.shape[0] - 1, h_store.shape[1]
    mask = torch.tensor(sizes).unsqueeze(1) > torch.arange(batch)
    out = h_store[1:] if not reverse else h_store[:steps]
    return out * mask.to(device=h_store.device, dtype=h_store.dtype).unsqueeze(2)


def _h_prev_pieces(h_store, h_init, steps, reverse) -> list[tuple[slice, Tensor]]:
    """h_{t-1} of every step as (time range, (n, B, H)) pieces, each contiguous."""
    if h_init is None:  # packed: slots lo .. lo+T-1
        lo = int(reverse)
        return [(slice(0, steps), h_store[lo : lo + steps])]
    if reverse:
        return [(slice(0, steps - 1), h_store[1:]), (slice(steps - 1, steps), h_init)]
    return [(slice(0, 1), h_init), (slice(1, steps), h_store[: steps - 1])]


def _linear_into(out: Tensor, x: Tensor, w: Tensor, bias: Tensor | None) -> None:
    """out = x @ w.t() + bias, one GEMM."""
    if bias is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(bias, x, w.t(), out=out)


def _nested_gemm(
    out: Tensor, x_in: Tensor, h_in: Tensor, w_t: tuple[Tensor, Tensor], bias: Tensor | None
) -> None:
    """out = bias + x~ @ W_ih^T + h~ @ W_hh^T: two accumulating GEMMs with K = H (one GEMM on
    [x~ | h~] with K = 2H measured equal at H <= 256 and 13-20% slower at H = 512)."""
    if bias is None:
        torch.mm(x_in, w_t[0], out=out)
    else:
        torch.addmm(bias, x_in, w_t[0], out=out)
    out.addmm_(h_in, w_t[1])


def _forward(
    x: Tensor,
    prep: _Prepared,
    h0: Tensor,
    c0: Tensor,
    sizes: list[int] | None,
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None] | None]:
    """The whole forward pass without autograd. Returns output, h_n, c_n and (if ``save``) the
    buffers the backward needs (``_Saved.tensors()``); without ``save`` the per-step buffers
    are rings."""
    steps, batch, inputs = x.shape
    depth, H = c0.shape[0], h0.shape[1]
    opts = (x.dtype, x.device)
    packed = sizes is not None and min(sizes) < batch
    lo, step = (1, -1) if reverse else (0, 1)  # time t reads slot t+lo, writes slot t+lo+step
    first = steps if reverse else 0  # slot of the initial state
    n = steps if save else 1

    new = _WORKSPACE.empty
    # inactive rows of packed batches meet zero gradients in the weight GEMMs: keep them finite
    new_finite = _WORKSPACE.zeros if packed else new
    bufs = []
    for k in range(depth):
        gates = steps if k == 0 else n  # level 0 holds the input projection of every step
        inner = k == depth - 1
        bufs.append(
            _LevelBuffers(
                sig=new((gates, batch, 3 * H), *opts),
                cand=new((gates, batch, H), *opts),
                cell=new((steps + 1 if save else 2, batch, H), *opts),
                tanh_c=new((n, batch, H), *opts),
                gin=None if inner else new_finite((n, batch, H), *opts),
                gcell=None if inner else new_finite((n, batch, H), *opts),
            )
        )
    levels = [_LevelViews(b, steps, H) for b in bufs]
    h_store, h_init = _h_slots(steps, batch, H, packed, *opts)
    hs = _h_slot_list(h_store, h_init, reverse)

    hs[first].copy_(h0)
    for k in range(depth):
        levels[k].cell[first].copy_(c0[k])

    # outer input projection of every step: one GEMM per gate group, straight into the buffers
    x2 = x.reshape(steps * batch, inputs)
    _linear_into(bufs[0].sig.view(-1, 3 * H), x2, prep.w_ih0_s, prep.bias0_s)
    _linear_into(bufs[0].cand.view(-1, H), x2, prep.w_ih0_g, prep.bias0_g)

    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        j = t + lo
        jn = j + step
        rows = None if sizes is None or sizes[t] == batch else sizes[t]
        if rows is not None:  # inactive rows keep their state
            hs[jn][rows:].copy_(hs[j][rows:])
            for lv in levels:
                lv.cell[jn][rows:].copy_(lv.cell[j][rows:])
            if rows == 0:
                continue
        _forward_step(levels, hs, prep, t, j, jn, rows)

    last = 0 if reverse else steps
    h_n = hs[last].clone()  # not a view of the output
    c_n = torch.stack([lv.cell[last] for lv in levels])
    out = _packed_output(h_store, sizes, reverse) if packed else h_store
    saved = _Saved(bufs, h_store, h_init).tensors() if save else None
    return out, h_n, c_n, saved


def _forward_step(levels: list[_LevelViews], hs, prep: _Prepared, t, j, jn, rows) -> None:
    """Time step ``t``: reads slot ``j`` (h and cells before the step), writes slot ``jn``."""
    depth = len(levels)
    # outer level: gates = (x W_ih^T + b, already in place) + h_prev W_hh^T
    lv = levels[0]
    h_prev = _rows(hs[j], rows)
    s, g = _rows(lv.sig[t], rows), _rows(lv.cand[t], rows)
    s.addmm_(h_prev, prep.w_hh0_s_t)
    g.addmm_(h_prev, prep.w_hh0_g_t)
    s.sigmoid_()
    if depth == 1:
        g.tanh_()  # nested: identity candidate at the outer level
    for k in range(1, depth):
        # inputs of level k: x~ = i*g and h~ = f*c_prev of level k-1
        x_in, h_in = _rows(lv.gin[t], rows), _rows(lv.gcell[t], rows)
        torch.mul(_rows(lv.i[t], rows), g, out=x_in)
        torch.mul(_rows(lv.f[t], rows), _rows(lv.cell[j], rows), out=h_in)
        lv = levels[k]
        s, g = _rows(lv.sig[t], rows), _rows(lv.cand[t], rows)
        _nested_gemm(s, x_in, h_in, prep.w_s_t[k], prep.bias_s[k])
        _nested_gemm(g, x_in, h_in, prep.w_g_t[k], prep.bias_g[k])
        s.sigmoid_()
        g.tanh_()
    # innermost cell: c = f * c_prev + i * g
    c_new = _rows(lv.cell[jn], rows)
    torch.mul(_rows(lv.f[t], rows), _rows(lv.cell[j], rows), out=c_new)
    c_new.addcmul_(_rows(lv.i[t], rows), g)
    # ascent: c^{k-1} = o_k * tanh(c^k), then h = o_0 * tanh(c^0)
    for k in range(depth - 1, -1, -1):
        lv = levels[k]
        tc = _rows(lv.tanh_c[t], rows)
        torch.tanh(_rows(lv.cell[jn], rows), out=tc)
        up = hs[jn] if k == 0 else levels[k - 1].cell[jn]
        torch.mul(_rows(lv.o[t], rows), tc, out=_rows(up, rows))


# --------------------------------------------------------------------------------------------
# backward


def _backward(
    saved_tensors: list[Tensor | None],
    x: Tensor,
    prep: _Prepared,
    sizes: list[int] | None,
    reverse: bool,
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    needs: dict[str, bool],
) -> dict[str, Tensor | None]:
    """Reverse time loop for state/gate gradients, then every weight gradient as big GEMMs.

    Returns gradients with gate rows in the internal order (o, i, f, g): ``x, h0, c0`` and per
    level k ``w_ih{k}``, ``w_hh{k}``, ``b{k}`` (the gradient of both biases).
    """
    saved = _Saved.from_tensors(saved_tensors)
    steps, batch = x.shape[0], x.shape[1]
    depth, H = len(saved.levels), d_hn.shape[1]
    opts = {"dtype": d_out.dtype, "device": d_out.device}
    packed = sizes is not None and min(sizes) < batch
    lo = int(reverse)  # time t used slot t + lo
    levels = [_LevelViews(b, steps, H) for b in saved.levels]

    # gate gradients of every step (T, B, 4H) per level; zero rows where a packed row is inactive
    alloc = _WORKSPACE.zeros if packed else _WORKSPACE.empty
    dz_bufs = [alloc((steps, batch, 4 * H), d_out.dtype, d_out.device) for _ in range(depth)]
    dz = [_GradViews(buf, H) for buf in dz_bufs]

    d_out = d_out.contiguous()
    dh = d_hn.clone(memory_format=torch.contiguous_format)  # carried gradient of h
    dc = d_cn.clone(memory_format=torch.contiguous_format)  # carried gradients of each cell
    dcs = dc.unbind(0)
    dht_full = torch.empty(batch, H, **opts)  # d h_t: d_out[t] + carried
    dcl_full = torch.empty(batch, H, **opts)  # d of the new cell of the current level
    da_full = torch.empty(batch, H, **opts)  # d x~ of a level, from the GEMM above
    db_full = torch.empty(batch, H, **opts)  # d h~

    for t in range(steps) if reverse else range(steps - 1, -1, -1):
        j = t + lo
        rows = None if sizes is None or sizes[t] == batch else sizes[t]
        if rows == 0:
            continue
        dht, dcl = _rows(dht_full, rows), _rows(dcl_full, rows)
        torch.add(_rows(d_out[t], rows), _rows(dh, rows), out=dht)
        # back through the ascent: h = o0 tanh(c0), c^{k-1} = o_k tanh(c^k)
        for k in range(depth):
            lv, tc = levels[k], _rows(levels[k].tanh_c[t], rows)
            grad = dht if k == 0 else dcl
            torch.mul(grad, tc, out=_rows(dz[k].o[t], rows))  # d o_k (pre-sigmoid later)
            torch.mul(grad, _rows(lv.o[t], rows), out=dcl)
            _tanh_backward(dcl, tc, grad_input=dcl)
            dcl.add_(_rows(dcs[k], rows))  # plus the gradient carried from step t+1
        # innermost: c = i*g + f*c_prev, so d(i*g) = d(f*c_prev) = dcl
        _gate_backward(levels[-1], dz[-1], dcl, dcl, dcs[-1], t, j, rows, tanh_candidate=True)
        # descent: level k's gate gradients -> d x~, d h~ of level k-1
        for k in range(depth - 1, 0, -1):
            dzt, da, db = _rows(dz[k].z[t], rows), _rows(da_full, rows), _rows(db_full, rows)
            torch.mm(dzt, prep.w_in[k][0], out=da)
            torch.mm(dzt, prep.w_in[k][1], out=db)
            _gate_backward(levels[k - 1], dz[k - 1], da, db, dcs[k - 1], t, j, rows, k > 1)
        torch.mm(_rows(dz[0].z[t], rows), prep.w_hh0, out=_rows(dh, rows))

    return _weight_grads(saved, x, prep, dz_bufs, dh, dc, reverse, needs)


def _gate_backward(lv, gz, d_ig, d_fc, dc_prev, t, j, rows, tanh_candidate) -> None:
    """From d(i*g) and d(f*c_prev) of one level at step t: the gradients of its gate
    pre-activations (into ``gz``, o already there) and of its previous cell (into ``dc_prev``)."""
    torch.mul(d_ig, _rows(lv.cand[t], rows), out=_rows(gz.i[t], rows))
    torch.mul(d_fc, _rows(lv.cell[j], rows), out=_rows(gz.f[t], rows))
    torch.mul(d_ig, _rows(lv.i[t], rows), out=_rows(gz.cand[t], rows))
    torch.mul(d_fc, _rows(lv.f[t], rows), out=_rows(dc_prev, rows))
    d_sig = _rows(gz.sig[t], rows)
    _sigmoid_backward(d_sig, _rows(lv.sig[t], rows), grad_input=d_sig)
    if tanh_candidate:  # the outer level of a nested cell has the identity
        d_cand = _rows(gz.cand[t], rows)
        _tanh_backward(d_cand, _rows(lv.cand[t], rows), grad_input=d_cand)


def _outer_grads(x, w_ih0, dz_bufs, h_prev, dh, dc, needs) -> dict[str, Tensor | None]:
    """The gradients of x, h0, c0, the outer weights and every bias after the time loop, each one
    GEMM (or sum) over all steps. ``dz_bufs``: per level (T, B, 4H) gate gradients, ``w_ih0``
    (4H, I) and ``h_prev`` (from ``_h_prev_pieces``) in the internal gate order."""
    steps, batch, inputs = x.shape
    H = dh.shape[1]
    rows = steps * batch
    dz0 = dz_bufs[0].view(rows, 4 * H)
    grads: dict[str, Tensor | None] = dict.fromkeys(needs)
    grads["h0"], grads["c0"] = dh, dc
    if needs["x"]:
        grads["x"] = torch.mm(dz0, w_ih0).view(steps, batch, inputs)
    if needs["w_ih0"]:
        grads["w_ih0"] = torch.mm(dz0.t(), x.reshape(rows, inputs))
    if needs["w_hh0"]:  # sum over the (one or two) contiguous pieces of h_{t-1}
        grads["w_hh0"] = dw = torch.zeros(4 * H, H, dtype=dh.dtype, device=dh.device)
        for span, h in h_prev:
            dw.addmm_(dz_bufs[0][span].reshape(-1, 4 * H).t(), h.reshape(-1, H))
    for k in range(len(dz_bufs)):
        if needs[f"b{k}"]:
            grads[f"b{k}"] = dz_bufs[k].view(rows, 4 * H).sum(0)
    return grads


def _weight_grads(saved, x, prep, dz_bufs, dh, dc, reverse, needs) -> dict[str, Tensor | None]:
    """Every parameter gradient after the time loop, each one GEMM over all steps."""
    steps, batch = x.shape[0], x.shape[1]
    H, rows = dh.shape[1], steps * batch
    h_prev = _h_prev_pieces(saved.h_store, saved.h_init, steps, reverse)
    grads = _outer_grads(x, prep.w_ih0, dz_bufs, h_prev, dh, dc, needs)
    for k in range(1, len(dz_bufs)):
        dzk = dz_bufs[k].view(rows, 4 * H)
        below = saved.levels[k - 1]  # inputs of level k: x~ and h~ of level k-1
        if needs[f"w_ih{k}"]:
            grads[f"w_ih{k}"] = torch.mm(dzk.t(), below.gin.view(rows, H))
        if needs[f"w_hh{k}"]:
            grads[f"w_hh{k}"] = torch.mm(dzk.t(), below.gcell.view(rows, H))
    return grads


# --------------------------------------------------------------------------------------------
# autograd


_TORCH_LOOP = _TimeLoop(_prepare_weights, _forward, _backward)


class _FusedNestedLSTM(torch.autograd.Function):
    """Autograd wrapper: inputs ``loop, x, h0, c0, sizes, reverse, *flat`` where ``loop`` is a
    ``_TimeLoop`` and ``flat`` the D x 4 level parameters (weight_ih, weight_hh, bias_ih,
    bias_hh), any bias may be None."""

    @staticmethod
    def forward(ctx, loop, x, h0, c0, sizes, reverse, *flat):
        weights = [LevelWeights(*flat[i : i + 4]) for i in range(0, len(flat), 4)]
        x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
        prep = loop.prepare(weights, h0.shape[1], for_backward=True)
        out, h_n, c_n, saved = loop.forward(x, prep, h0, c0, sizes, reverse, save=True)
        ctx.loop, ctx.prep, ctx.sizes, ctx.reverse = loop, prep, sizes, reverse
        # all through save_for_backward: autograd frees them after the backward (so the pooled
        # buffers can be reused) and reports in-place changes of x or of the output
        ctx.save_for_backward(x, *saved)
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn):
        x, *saved = ctx.saved_tensors  # checks versions
        H = d_hn.shape[1]
        ng = ctx.needs_input_grad[1:]  # the first input is the loop
        depth = (len(ng) - 5) // 4
        flat_needs = ng[5:]  # per flat parameter: (w_ih, w_hh, b_ih, b_hh) x D
        needs = {"x": ng[0]}
        for k in range(depth):
            needs[f"w_ih{k}"] = flat_needs[4 * k]
            needs[f"w_hh{k}"] = flat_needs[4 * k + 1]
            needs[f"b{k}"] = flat_needs[4 * k + 2] or flat_needs[4 * k + 3]
        grads = ctx.loop.backward(
            saved, x, ctx.prep, ctx.sizes, ctx.reverse, d_out, d_hn, d_cn, needs
        )
        flat_grads: list[Tensor | None] = []
        for k in range(depth):  # back to nn.LSTM's gate order; both biases get the same
            w_ih, w_hh, b = (grads[f"{name}{k}"] for name in ("w_ih", "w_hh", "b"))
            b = None if b is None else _external(b, H)
            flat_grads += [None if w_ih is None else _external(w_ih, H)]
            flat_grads += [None if w_hh is None else _external(w_hh, H), b, b]
        flat_grads = [g if need else None for g, need in zip(flat_grads, flat_needs)]
        h0_grad = grads["h0"] if ng[1] else None
        c0_grad = grads["c0"] if ng[2] else None
        return (None, grads["x"], h0_grad, c0_grad, None, None, *flat_grads)
