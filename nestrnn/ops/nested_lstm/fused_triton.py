"""Triton-fused nested-LSTM op: one direction of one layer over a whole sequence.

Same contract as ``naive.nested_lstm_naive`` (see that module for shapes). The layout of the work
(DESIGN.md section 4):

forward
    1. one GEMM for the outer input projection of all steps: ``xproj = x W_ih^T + b_ih + b_hh``
       (torch, operands in the input dtype, result kept in fp32);
    2. per step, D launches on a grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)); a program owns all four
       gates of BLOCK_H hidden units:
       - ``fwd_outer_kernel``: level-0 gates = xproj[t] + h W_hh^T; epilogue writes level 1's
         inputs x~ = i*g and h~ = f*c^0 (for D == 1 it is a whole LSTM step);
       - ``fwd_nested_kernel`` for levels 1..D-1: gates from x~, h~; the last level's epilogue
         adds the cell, runs the ascent c^{k-1} = o_k tanh(c^k), h = o_0 tanh(c^0), and writes
         every new cell, h and the output row (packed batches: inactive rows keep their state).
    Saved for backward: activated gates of every level (fp32), every cell state (fp32), the h
    states and the level inputs x~, h~ (input dtype; they are the weight-gradient GEMM operands).

backward
    a reverse time loop of D launches per step that computes gate gradients dA (pre-activation)
    and carries dh, dc only: ``bwd_inner_kernel`` (dh from the later step's outer gates, descent
    through the ascent, innermost gate gradients), then ``bwd_level_kernel`` for levels D-2..0.
    After the loop every weight, bias and input gradient is one large GEMM or reduction over all
    steps (never summed inside the loop).

Optional (GPU only, off by default): ``TritonConfig(cuda_graph=True)`` or the environment variable
``NESTRNN_TRITON_CUDA_GRAPH=1`` captures each step loop in a CUDA graph, cached per shape, to remove
the per-launch overhead; inputs are copied into the graph's static buffers and the saved tensors are
cloned out, so concurrent calls (bidirectional layers, several layers) stay independent.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.triton_kernels import (
    bwd_inner_kernel,
    bwd_level_kernel,
    fwd_nested_kernel,
    fwd_outer_kernel,
)

__all__ = ["SUPPORTED_DTYPES", "TritonConfig", "nested_lstm_triton", "pick_config"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the fused kernels. ``None`` fields are chosen by ``pick_config``."""

    block_b: int | None = None  # batch rows per program (power of two; >= 16 on a GPU)
    block_h: int | None = None  # hidden units per program, all four gates of each (power of two)
    block_k: int | None = None  # reduction chunk of the per-step GEMMs (power of two)
    num_warps: int | None = None  # warps per program
    cuda_graph: bool | None = None  # capture the step loops in CUDA graphs (None: env variable)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pick_config(batch: int, hidden: int, config: TritonConfig | None = None) -> TritonConfig:
    """Fill in the block sizes with a small heuristic (no autotuning: it fails in the interpreter).

    ``tl.dot`` needs every block dimension >= 16 on a GPU. The per-step GEMMs are small and bound by
    reading the weights, so on a GPU the hidden dimension is cut into many programs and the
    reduction chunk kept at 32 (the forward kernels hold four or eight weight tiles; larger tiles
    spill registers in fp32, checked with ptxas for sm_90). Under the interpreter, where each
    program and loop iteration costs Python time, blocks are made as large as allowed.
    """
    cfg = config or TritonConfig()
    interp = _interpreting()
    block_b = cfg.block_b or min(max(16, _pow2(batch)), 64)
    if cfg.block_h:
        block_h = cfg.block_h
    elif interp:
        block_h = min(max(16, _pow2(hidden)), 64)
    else:
        block_h = 16 if hidden <= 1024 or block_b >= 64 else 32
    block_k = cfg.block_k or min(max(16, _pow2(hidden)), 64 if interp else 32)
    for name, value in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of two, got {value}")
    num_warps = cfg.num_warps or (4 if block_b * block_h <= 512 else 8)
    cuda_graph = cfg.cuda_graph
    if cuda_graph is None:
        cuda_graph = os.environ.get("NESTRNN_TRITON_CUDA_GRAPH", "0") == "1"
    return TritonConfig(block_b, block_h, block_k, num_warps, cuda_graph)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's TF32 switch (off by default: exact IEEE fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


# ---------------------------------------------------------------------------------------------------
# the step loops (kernel launches only, so that they can be captured in a CUDA graph)


@dataclass
class _Meta:
    steps: int
    batch: int
    hidden: int
    depth: int
    reverse: bool
    packed: bool
    has_bias: bool
    cfg: TritonConfig
    dot_prec: str

    def grid(self) -> tuple[int, int]:
        return (
            triton.cdiv(self.batch, self.cfg.block_b),
            triton.cdiv(self.hidden, self.cfg.block_h),
        )

    def consts(self) -> dict:
        return dict(
            REVERSE=self.reverse,
            HAS_BS=self.packed,
            BLOCK_B=self.cfg.block_b,
            BLOCK_H=self.cfg.block_h,
            BLOCK_K=self.cfg.block_k,
            DOT_PREC=self.dot_prec,
            num_warps=self.cfg.num_warps,
        )


def _forward_loop(m: _Meta, b: dict[str, Tensor]) -> None:
    grid, kw, T, B, H, D = m.grid(), m.consts(), m.steps, m.batch, m.hidden, m.depth
    for s in range(T):
        fwd_outer_kernel[grid](
            b["xproj"], b["hbuf"], b["w_hh0"], b["gates"], b["xt"], b["ht"], b["cbuf"], b["y"],
            b["bs"], s, T, B, H, DEPTH=D, **kw,
        )  # fmt: skip
        for k in range(1, D):
            fwd_nested_kernel[grid](
                b["xt"], b["ht"], b[f"w_ih{k}"], b[f"w_hh{k}"], b[f"bias{k}"], b["gates"],
                b["cbuf"], b["hbuf"], b["y"], b["bs"], s, T, B, H,
                LEVEL=k, DEPTH=D, HAS_BIAS=m.has_bias, **kw,
            )  # fmt: skip


def _backward_loop(m: _Meta, b: dict[str, Tensor]) -> None:
    grid, kw, T, B, H, D = m.grid(), m.consts(), m.steps, m.batch, m.hidden, m.depth
    for s in range(T - 1, -1, -1):
        bwd_inner_kernel[grid](
            b["dA"], b["w_hh0"], b["dh"], b["dc"], b["dy"], b["gates"], b["cbuf"], b["bs"],
            s, T, B, H, DEPTH=D, **kw,
        )  # fmt: skip
        for k in range(D - 2, -1, -1):
            bwd_level_kernel[grid](
                b["dA"], b[f"w_ih{k + 1}"], b[f"w_hh{k + 1}"], b["dc"], b["gates"], b["cbuf"],
                b["bs"], s, T, B, H, LEVEL=k, **kw,
            )  # fmt: skip


class _Graphed:
    """A step loop captured in a CUDA graph over static buffers (GPU only)."""

    def __init__(self, loop, meta: _Meta, static: dict[str, Tensor]):
        self.static = static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up run: compiles the kernels outside the capture
            loop(meta, static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loop(meta, static)

    def __call__(self, inputs: dict[str, Tensor], fill=None) -> dict[str, Tensor]:
        for name, value in inputs.items():
            self.static[name].copy_(value)
        if fill is not None:
            fill(self.static)
        self.graph.replay()
        return self.static


_GRAPHS: OrderedDict[tuple, _Graphed] = OrderedDict()
_MAX_GRAPHS = 16


def _graph_enabled(meta: _Meta, bufs: dict[str, Tensor]) -> bool:
    return bool(meta.cfg.cuda_graph) and bufs["gates"].is_cuda


def _run(loop, meta: _Meta, bufs: dict[str, Tensor], outputs: tuple[str, ...], fill=None) -> dict:
    """Run a step loop directly, or through a cached CUDA graph when enabled and on CUDA.

    ``bufs`` holds every tensor the loop touches; ``fill(bufs)`` writes values into parts of buffers
    (the initial state slots). In graph mode every buffer not named in ``outputs`` is copied into
    the graph's static twin, ``fill`` is applied to the static buffers, and the outputs are cloned
    out (the static buffers are reused by the next call).
    """
    if not _graph_enabled(meta, bufs):
        if fill is not None:
            fill(bufs)
        loop(meta, bufs)
        return bufs
    key = (
        loop.__name__,
        bufs["gates"].device,
        *((name, tuple(v.shape), v.dtype) for name, v in sorted(bufs.items())),
        meta.steps, meta.batch, meta.hidden, meta.depth, meta.reverse, meta.packed,
        meta.has_bias, meta.cfg, meta.dot_prec,
    )  # fmt: skip
    inputs = {name: v for name, v in bufs.items() if name not in outputs}
    graphed = _GRAPHS.get(key)
    if graphed is None:
        static = {name: torch.zeros_like(v) for name, v in bufs.items()}
        for name, v in inputs.items():
            static[name].copy_(v)
        if fill is not None:
            fill(static)
        graphed = _GRAPHS[key] = _Graphed(loop, meta, static)
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    static = graphed(inputs, fill)
    return {**bufs, **{name: static[name].clone() for name in outputs}}


# ---------------------------------------------------------------------------------------------------
# autograd


def _check(
    x: Tensor, weights: list[LevelWeights], h0: Tensor, c0: Tensor, batch_sizes: Tensor | None
) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the triton backend supports float32, float16 and bfloat16 inputs, got {x.dtype}"
        )
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ValueError(
            "the triton backend cannot run bfloat16 under TRITON_INTERPRET=1 (the interpreter "
            "computes bfloat16 wrongly); use float32 or float16 on CPU, or a CUDA device"
        )
    if not (x.is_cuda or _interpreting()):
        raise ValueError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on "
            f"CPU); got input on {x.device}"
        )
    if x.dim() != 3:
        raise ValueError(f"x must be (T, B, I), got shape {tuple(x.shape)}")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one level")
    _, batch, _ = x.shape
    hidden = weights[0].weight_hh.shape[1]
    if tuple(h0.shape) != (batch, hidden):
        raise ValueError(f"h0 must be {(batch, hidden)}, got {tuple(h0.shape)}")
    if tuple(c0.shape) != (len(weights), batch, hidden):
        raise ValueError(f"c0 must be {(len(weights), batch, hidden)}, got {tuple(c0.shape)}")
    for k, lw in enumerate(weights):
        in_size = x.shape[2] if k == 0 else hidden
        shapes = {
            "weight_ih": (4 * hidden, in_size),
            "weight_hh": (4 * hidden, hidden),
            "bias_ih": (4 * hidden,),
            "bias_hh": (4 * hidden,),
        }
        for name, shape in shapes.items():
            p = getattr(lw, name)
            if p is None:
                if name.startswith("weight"):
                    raise ValueError(f"level {k} {name} is None")
                continue
            if tuple(p.shape) != shape:
                raise ValueError(f"level {k} {name} must be {shape}, got {tuple(p.shape)}")
            if p.dtype != x.dtype:
                raise ValueError(
                    f"level {k} {name} has dtype {p.dtype} but the input has {x.dtype}; the triton "
                    "backend needs weights and input in one dtype"
                )
            if p.device != x.device:
                raise ValueError(f"level {k} {name} is on {p.device}, the input on {x.device}")
    if batch_sizes is not None and tuple(batch_sizes.shape) != (x.shape[0],):
        raise ValueError(f"batch_sizes must be ({x.shape[0]},), got {tuple(batch_sizes.shape)}")


def _bias_sum(lw: LevelWeights) -> Tensor | None:
    biases = [b.float() for b in (lw.bias_ih, lw.bias_hh) if b is not None]
    if not biases:
        return None
    return biases[0] if len(biases) == 1 else biases[0] + biases[1]


class _NestedLSTMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, batch_sizes, reverse, cfg, depth, *flat):
        weights = [LevelWeights(*flat[4 * k : 4 * k + 4]) for k in range(depth)]
        T, B, In = x.shape
        H = h0.shape[1]
        D, dt, dev = depth, x.dtype, x.device
        has_bias = any(_bias_sum(lw) is not None for lw in weights[1:])
        meta = _Meta(
            T, B, H, D, reverse, batch_sizes is not None, has_bias, cfg, _dot_precision(dt)
        )
        init, final = (T, 0) if reverse else (0, T)

        xproj = torch.matmul(x.reshape(T * B, In), weights[0].weight_ih.t()).float()
        b0 = _bias_sum(weights[0])
        if b0 is not None:
            xproj += b0
        hbuf = torch.empty((T + 1, B, H), dtype=dt, device=dev)
        cbuf = torch.empty((D, T + 1, B, H), dtype=torch.float32, device=dev)

        def fill(b: dict[str, Tensor]) -> None:  # the initial state slots
            b["hbuf"][init] = h0
            b["cbuf"][:, init] = c0

        dummy = torch.zeros(1, dtype=dt, device=dev)
        bufs = {
            "xproj": xproj.view(T, B, 4 * H),
            "hbuf": hbuf,
            "cbuf": cbuf,
            "gates": torch.empty((D, T, B, 4 * H), dtype=torch.float32, device=dev),
            "xt": torch.empty((D - 1, T, B, H), dtype=dt, device=dev) if D > 1 else dummy,
            "ht": torch.empty((D - 1, T, B, H), dtype=dt, device=dev) if D > 1 else dummy.clone(),
            "y": torch.empty((T, B, H), dtype=dt, device=dev),
            "bs": (
                batch_sizes.to(device=dev, dtype=torch.int32)
                if batch_sizes is not None
                else torch.zeros(1, dtype=torch.int32, device=dev)
            ),
            "w_hh0": weights[0].weight_hh.contiguous(),
        }
        for k in range(1, D):
            bufs[f"w_ih{k}"] = weights[k].weight_ih.contiguous()
            bufs[f"w_hh{k}"] = weights[k].weight_hh.contiguous()
            bias = _bias_sum(weights[k])
            if bias is None:
                bias = torch.zeros(4 * H if has_bias else 1, dtype=torch.float32, device=dev)
            bufs[f"bias{k}"] = bias
        outputs = ("hbuf", "cbuf", "gates", "xt", "ht", "y")
        if T > 0:
            bufs = _run(_forward_loop, meta, bufs, outputs, fill)
        else:
            fill(bufs)

        ctx.meta = meta
        ctx.has_bias = [(lw.bias_ih is not None, lw.bias_hh is not None) for lw in weights]
        ctx.dtypes = (h0.dtype, c0.dtype)
        wts = [bufs["w_hh0"]] + [bufs[f"{n}{k}"] for k in range(1, D) for n in ("w_ih", "w_hh")]
        ctx.save_for_backward(
            x, weights[0].weight_ih, bufs["hbuf"], bufs["cbuf"], bufs["gates"], bufs["xt"],
            bufs["ht"], bufs["bs"], *wts,
        )  # fmt: skip
        y = bufs["y"]
        h_n = bufs["hbuf"][final].clone()
        c_n = bufs["cbuf"][:, final].to(c0.dtype, copy=True)
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        m: _Meta = ctx.meta
        x, w_ih0, hbuf, cbuf, gates, xt, ht, bs, w_hh0, *wts = ctx.saved_tensors
        T, B, H, D = m.steps, m.batch, m.hidden, m.depth
        dt, dev = x.dtype, x.device
        bufs = {
            "dA": torch.empty((D, T, B, 4 * H), dtype=torch.float32, device=dev),
            "dh": torch.empty((B, H), dtype=torch.float32, device=dev),
            "dc": torch.empty((D, B, H), dtype=torch.float32, device=dev),
            "dy": dy.contiguous(),
            "gates": gates,
            "cbuf": cbuf,
            "bs": bs,
            "w_hh0": w_hh0,
        }
        for k in range(1, D):
            bufs[f"w_ih{k}"], bufs[f"w_hh{k}"] = wts[2 * (k - 1)], wts[2 * (k - 1) + 1]

        def fill(b: dict[str, Tensor]) -> None:  # gradients flowing into the final state
            b["dh"].copy_(dh_n)
            b["dc"].copy_(dc_n)

        if T > 0:
            bufs = _run(_backward_loop, m, bufs, ("dA", "dh", "dc"), fill)
        else:
            fill(bufs)
        dA, dh, dc = bufs["dA"], bufs["dh"], bufs["dc"]

        # everything below is one GEMM / reduction over all steps
        need = ctx.needs_input_grad
        grads_w: list[Tensor | None] = []
        dA_op = dA.to(dt).reshape(D, T * B, 4 * H)
        dx = dh0 = None
        if need[0]:
            dx = torch.matmul(dA_op[0], w_ih0).view(T, B, -1)
        if need[1]:
            if T > 0:
                first = T - 1 if m.reverse else 0
                dh0 = torch.matmul(dA[0, first], w_hh0.float())
                if m.packed:
                    active = torch.arange(B, device=dev) < bs[first].long()
                    dh0 = torch.where(active[:, None], dh0, dh)
            else:
                dh0 = dh
            dh0 = dh0.to(ctx.dtypes[0])
        dc0 = dc.to(ctx.dtypes[1]) if need[2] else None
        h_prev = hbuf[1:] if m.reverse else hbuf[:-1]
        for k in range(D):
            base = 7 + 4 * k
            g_k = dA_op[k].t()  # (4H, T*B)
            if k == 0:
                operands = (x.reshape(T * B, -1), h_prev.reshape(T * B, H))
            else:
                operands = (xt[k - 1].reshape(T * B, H), ht[k - 1].reshape(T * B, H))
            for j in range(2):
                grads_w.append(torch.matmul(g_k, operands[j]) if need[base + j] else None)
            db = dA[k].sum((0, 1)) if any(need[base + 2 : base + 4]) else None
            for j in range(2):
                if need[base + 2 + j] and ctx.has_bias[k][j]:
                    grads_w.append(db.to(dt))
                else:
                    grads_w.append(None)
        return (dx, dh0, dc0, None, None, None, None, *grads_w)


def nested_lstm_triton(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    *,
    config: TritonConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run one direction of a Nested LSTM layer with fused Triton kernels.

    Same arguments and results as ``nested_lstm_naive``: x (T, B, I), D ``LevelWeights`` (level 0
    outer), h0 (B, H), c0 (D, B, H), optional ``batch_sizes`` (T,) non-increasing, ``reverse``.
    Returns ``output (T, B, H)``, ``h_n (B, H)``, ``c_n (D, B, H)``; state is carried in fp32
    internally. ``config`` overrides block sizes / num_warps / CUDA graphs (see ``TritonConfig``).
    """
    weights = [LevelWeights(*lw) for lw in weights]
    _check(x, weights, h0, c0, batch_sizes)
    cfg = pick_config(x.shape[1], h0.shape[1], config)
    flat = [p for lw in weights for p in lw]
    return _NestedLSTMTriton.apply(
        x.contiguous(), h0, c0, batch_sizes, bool(reverse), cfg, len(weights), *flat
    )
