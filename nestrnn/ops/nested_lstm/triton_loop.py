"""The op's CUDA implementation: fused Triton kernels (``triton_kernels.py``), D launches a step.

forward
    1. one GEMM for the outer input projection of all steps, ``x W_ih^T + b_ih + b_hh`` (torch,
       operands in the input dtype, result in fp32 straight into level 0's ``gates``);
    2. per step, D launches on a grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)); a program owns all four
       gates of BLOCK_H hidden units: ``fwd_outer_kernel`` for level 0, ``fwd_nested_kernel`` for
       levels 1..D-1; each level's epilogue writes the next level's input, and the last level's
       runs the whole ascent and writes every new cell, h and the output row.
backward
    a reverse time loop of D launches per step for the gate gradients and the carried dh, dc:
    ``bwd_inner_kernel``, then ``bwd_level_kernel`` for levels D-2..0. The parameter gradients are
    GEMMs after the loop (``gradients.py``).

Inputs: float32, float16 or bfloat16 (the saved state is fp32, the level inputs stay in the input
dtype as GEMM operands).

cuBLAS GEMMs (``TritonConfig.cublas_gemms``): before each launch ``torch.mm`` computes the step's
GEMM into a small buffer (``g``; ``g_h``, ``g_x`` backward) and the kernel adds it instead of running
its own dot; in half precision the backward kernels also write the gate gradients in the input
dtype (``dA_op``), the next GEMM's operand. Each call has two launch configurations
(``_Launches``): one for a loop run in a CUDA graph, one for a loop launched directly
(``pick_config``'s ``graphed``).

CUDA graphs: a step loop can run as a captured CUDA graph, cached per shape; inputs are copied into
the graph's static buffers and its outputs cloned out, so calls that share a graph (several layers,
both directions) stay independent. ``TritonConfig(cuda_graph=...)`` or ``NESTRNN_TRITON_CUDA_GRAPH``
(``1``, ``0``, ``auto``) decide; by default (``auto``) a loop is captured when its shapes repeat
(the second call with the same key) and B * H is at most ``AUTO_GRAPH_MAX_BATCH_HIDDEN``, where
graphs measured faster, while the cached static buffers fit in a share of the device's memory (and
in half of what is free); a loop whose graph had to be evicted runs directly from then on.
Inside another capture (a user's graph, ``torch.compile(mode="reduce-overhead")``) the loop runs
directly, with the graph configuration, to be captured by that one.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, cast

import torch
import triton
from torch import Tensor

from nestrnn.activations import activation_code
from nestrnn.ops.common.levels import LevelActivations, LevelWeights
from nestrnn.ops.nested_lstm.layout import Saved, empty_saved, state_slots
from nestrnn.ops.nested_lstm.triton_kernels import (
    bwd_inner_kernel,
    bwd_level_kernel,
    fwd_nested_kernel,
    fwd_outer_kernel,
)

__all__ = [
    "TritonConfig",
    "backward",
    "clear_cuda_graphs",
    "cuda_graph_count",
    "cuda_graph_setting",
    "forward",
    "pick_config",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of the kernels. ``None`` fields are chosen by ``pick_config``."""

    block_b: int | None = None  # batch rows per program (power of two; >= 16 on a GPU)
    block_h: int | None = None  # hidden units per program, all four gates of each (power of two)
    block_k: int | None = None  # reduction chunk of the per-step GEMMs (power of two)
    num_warps: int | None = None  # warps per program
    cuda_graph: bool | None = None  # step loops as CUDA graphs (None: the env variable, else auto)
    num_stages: int | None = None  # software-pipelining depth of the K loops (None: Triton's)
    cublas_gemms: bool | None = None  # per-step GEMMs by cuBLAS, the kernels doing the rest


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pick_config(
    batch: int,
    hidden: int,
    config: TritonConfig | None = None,
    dtype: torch.dtype = torch.float32,
    graphed: bool = False,
) -> TritonConfig:
    """Fill in ``config``'s unset fields for a call with ``batch`` rows, ``hidden`` units and
    operands in ``dtype``, for a step loop run in a CUDA graph (``graphed``) or launched directly
    (no autotuning: it fails in the interpreter).

    On a GPU from measurements (``_measured_blocks``); under the interpreter, where each program and
    loop iteration costs Python time, blocks are made as large as allowed.
    """
    cfg = config or TritonConfig()
    if _interpreting():
        size = min(max(16, _pow2(hidden)), 64)
        block_b = _batch_block(batch)
        chosen = (block_b, size, size, 4 if block_b * size <= 512 else 8, None, False)
    else:
        chosen = _measured_blocks(batch, hidden, dtype, graphed)
    given = (cfg.block_b, cfg.block_h, cfg.block_k, cfg.num_warps, cfg.num_stages,
             cfg.cublas_gemms)  # fmt: skip
    block_b, block_h, block_k, num_warps, num_stages, cublas = cast(
        Any, (mine if mine is not None else default for mine, default in zip(given, chosen))
    )
    for name, value in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"TritonConfig.{name} must be a power of two, got {value}")
    cuda_graph = cfg.cuda_graph if cfg.cuda_graph is not None else cuda_graph_setting()
    return TritonConfig(block_b, block_h, block_k, num_warps, cuda_graph, num_stages, cublas)


def _batch_block(batch: int) -> int:
    """Rows a program: the batch rounded up to a power of two, from 16 (tl.dot) to 64."""
    return min(max(16, _pow2(batch)), 64)


def _measured_blocks(batch: int, hidden: int, dtype: torch.dtype, graphed: bool) -> tuple:
    """(block_b, block_h, block_k, num_warps, num_stages, cublas_gemms) on a GPU.

    From the fastest of the candidates that benchmarks/tune_triton.py timed on an H200 at
    (B, H) = (32, 256), (128, 512), (128, 1024), (256, 1024), (16, 768), depth 2, forward and
    forward+backward (results/tune_triton_cuda*.md):

    - in CUDA graphs the per-step GEMMs by cuBLAS took 0.66-0.96x the fused kernels' forward+
      backward time in 16-bit and 0.41-0.62x in float32, forward 0.63-1.22x and 0.26-0.47x;
    - launched directly, cuBLAS's extra launches cost more than they save (1.0-3.1x in 16-bit),
      except in IEEE float32 from B * H = 128 * 1024 (0.26-0.30x forward, 0.46-0.48x forward+
      backward), where the kernels' FMA dots are slowest;
    - the fused kernels' blocks: 0.59-0.84x the time of the earlier fixed 16-unit, 32-deep blocks
      in 16-bit from B = 64 and 0.53-0.61x in float32 from B = 32 (TF32 dots take the same,
      unmeasured).

    ``tl.dot`` needs every block dimension >= 16; these tiles compile for sm_90 without register
    spills.
    """
    small = max(16, _pow2(hidden))  # no block wider than the hidden size needs
    block_b = _batch_block(batch)
    chosen: tuple[int, int, int, int, int | None]
    if dtype == torch.float32:  # the fused kernels' FMA dots: small tiles, 4 warps
        chosen = (16, 16, 64, 4, None) if batch <= 32 else (32, 32, 32, 4, None)
        cublas = graphed or batch * hidden >= 128 * 1024
    elif block_b == 16:
        chosen, cublas = (16, 16, 64, 4, 4), graphed
    elif block_b == 32:
        chosen, cublas = (32, 16, 32, 4, None), graphed
    elif graphed:  # pointwise tiles only
        chosen, cublas = (32, 32, 32, 4, None), True
    elif batch * hidden >= 256 * 1024:  # enough tiles to fill the GPU with wider ones
        chosen, cublas = (64, 32, 128, 8, None), False
    else:
        chosen, cublas = (64, 16, 64, 4, None), False
    block_b, block_h, block_k, num_warps, num_stages = chosen
    return block_b, min(block_h, small), min(block_k, small), num_warps, num_stages, cublas


_GRAPH_SETTINGS = {"1": True, "0": False, "auto": None, "": None}


def cuda_graph_setting() -> bool | None:
    """``NESTRNN_TRITON_CUDA_GRAPH``: True (always), False (never) or None (auto, the default)."""
    value = os.environ.get("NESTRNN_TRITON_CUDA_GRAPH", "auto").strip().lower()
    if value not in _GRAPH_SETTINGS:
        raise ValueError(f"NESTRNN_TRITON_CUDA_GRAPH must be 1, 0 or auto, got {value!r}")
    return _GRAPH_SETTINGS[value]


def pack_codes(names: list[str]) -> int:
    """Activation codes of every level, 4 bits a level (level 0 in the lowest bits)."""
    return sum(activation_code(name) << (4 * k) for k, name in enumerate(names))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 matmuls follow torch's TF32 switch (off by default: exact IEEE fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


# ---------------------------------------------------------------------------------------------------
# the step loops (kernel launches only, so that they can be captured in a CUDA graph)


@dataclass(frozen=True)
class _Launch:
    """Everything about a call that the step loops need besides its buffers."""

    steps: int
    batch: int
    hidden: int
    activations: tuple[LevelActivations, ...]
    reverse: bool
    packed: bool
    has_bias: bool
    cfg: TritonConfig
    dot_prec: str
    dtype: torch.dtype  # of the GEMM operands (the input's)

    @property
    def depth(self) -> int:
        return len(self.activations)

    def grid(self) -> tuple[int, int]:
        return (
            triton.cdiv(self.batch, self.cfg.block_b),
            triton.cdiv(self.hidden, self.cfg.block_h),
        )

    @property
    def cublas(self) -> bool:
        return bool(self.cfg.cublas_gemms)

    @property
    def op_copy(self) -> bool:
        """Whether the backward kernels also write the gate gradients in the weights' dtype, as
        the operand of the next cuBLAS GEMM (the fp32 ``dA`` is that operand in float32)."""
        return self.cublas and self.dtype != torch.float32

    def consts(self) -> dict:
        stages = {} if self.cfg.num_stages is None else {"num_stages": self.cfg.num_stages}
        return dict(
            REVERSE=self.reverse,
            HAS_BS=self.packed,
            BLOCK_B=self.cfg.block_b,
            BLOCK_H=self.cfg.block_h,
            BLOCK_K=self.cfg.block_k,
            DOT_PREC=self.dot_prec,
            CUBLAS=self.cublas,
            num_warps=self.cfg.num_warps,
            **stages,
        )

    def slots(self, s: int) -> tuple[int, int]:
        """Time index of processing step ``s`` and the state slot before it (``_slots``)."""
        return (self.steps - 1 - s, self.steps - s) if self.reverse else (s, s)

    def codes(self, field: str) -> int:
        """Every level's activation code for ``field``, packed (``pack_codes``)."""
        return pack_codes([getattr(level, field) for level in self.activations])

    def level_codes(self, field: str) -> list[int]:
        """Each level's activation code for ``field``."""
        return [activation_code(getattr(level, field)) for level in self.activations]


def _forward_loop(m: _Launch, b: dict[str, Tensor]) -> None:
    grid, kw, T, B, H, D = m.grid(), m.consts(), m.steps, m.batch, m.hidden, m.depth
    # the codes are computed once a call: the loop is bound by launch overhead
    gate, cand, cells = m.level_codes("gate"), m.level_codes("candidate"), m.codes("cell")
    for s in range(T):
        t, prev = m.slots(s)
        if m.cublas:  # the kernels read the step's GEMM from b["g"]
            _gemm(b["h"][prev], b["w_hh0"].t(), b["g"])
        fwd_outer_kernel[grid](
            b["gates"], b["h"], b["w_hh0"], b["cells"], b["act_cells"], b["inputs"], b["y"],
            b["bs"], b["g"], s, T, B, H, DEPTH=D, GATE_ACT=gate[0], CAND_ACT=cand[0],
            CELL_ACTS=cells, **kw,
        )  # fmt: skip
        for k in range(1, D):
            if m.cublas:
                _gemm(b["inputs"][k - 1, t], b[f"w{k}"].t(), b["g"])
            fwd_nested_kernel[grid](
                b["gates"], b["inputs"], b[f"w{k}"], b[f"bias{k}"], b["cells"], b["act_cells"],
                b["h"], b["y"], b["bs"], b["g"], s, T, B, H, LEVEL=k, DEPTH=D, GATE_ACT=gate[k],
                CAND_ACT=cand[k], CELL_ACTS=cells, HAS_BIAS=m.has_bias, **kw,
            )  # fmt: skip


def _backward_loop(m: _Launch, b: dict[str, Tensor]) -> None:
    grid, kw, T, B, H, D = m.grid(), m.consts(), m.steps, m.batch, m.hidden, m.depth
    gate, cand = m.level_codes("gate"), m.level_codes("candidate")
    gate_acts, cand_acts, cell_acts = m.codes("gate"), m.codes("candidate"), m.codes("cell")
    dA, op = b["dA"], b["dA_op"]
    for s in range(T - 1, -1, -1):
        t, _prev = m.slots(s)
        if m.cublas and s + 1 < T:  # dh = dA^0 of the step processed before @ W_hh^0
            t_next = t - 1 if m.reverse else t + 1
            _gemm(op[0] if m.op_copy else dA[0, t_next], b["w_hh0"], b["g_h"])
        bwd_inner_kernel[grid](
            dA, b["w_hh0"], b["dh"], b["dc"], b["dy"], b["gates"], b["cells"], b["act_cells"],
            b["bs"], b["g_h"], op, s, T, B, H, DEPTH=D, GATE_ACTS=gate_acts, CAND_ACTS=cand_acts,
            CELL_ACTS=cell_acts, OP_COPY=m.op_copy, **kw,
        )  # fmt: skip
        for k in range(D - 2, -1, -1):
            if m.cublas:  # [dx~ | dh~] = dA^{k+1} @ [W_ih | W_hh] of level k+1
                _gemm(op[k + 1] if m.op_copy else dA[k + 1, t], b[f"w{k + 1}"], b["g_x"])
            bwd_level_kernel[grid](
                dA, b[f"w{k + 1}"], b["dc"], b["gates"], b["cells"], b["bs"], b["g_x"], op, s, T,
                B, H, LEVEL=k, GATE_ACT=gate[k], CAND_ACT=cand[k], OP_COPY=m.op_copy, **kw,
            )  # fmt: skip


def _gemm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b by cuBLAS (on CPU, under the interpreter, torch's matmul), in out's dtype."""
    if a.dtype != b.dtype:  # on CPU the saved level inputs are in the state dtype (layout.py)
        a = a.to(b.dtype)
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Result dtype of the cuBLAS step GEMMs: float32 where torch multiplies ``dtype`` operands into
    a float32 result on ``device`` (no rounding of the pre-activations), else ``dtype``."""
    if dtype == torch.float32 or _float32_results(dtype, device.type):
        return torch.float32
    return dtype


@functools.cache
def _float32_results(dtype: torch.dtype, device_type: str) -> bool:
    """Whether ``torch.mm`` gives a float32 result of ``dtype`` operands here (tried once)."""
    one = torch.ones(16, 16, dtype=dtype, device=device_type)
    try:
        _gemm(one, one, torch.empty(16, 16, dtype=torch.float32, device=device_type))
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _gemm_buffers(
    m: _Launches, device: torch.device, shapes: dict[str, tuple]
) -> dict[str, Tensor]:
    """The cuBLAS GEMMs' result buffers (one element each when the kernels do every GEMM)."""
    dtype = _gemm_dtype(m.direct.dtype, device) if m.cublas else torch.float32
    return {
        name: torch.empty(shape if m.cublas else (1,), dtype=dtype, device=device)
        for name, shape in shapes.items()
    }


class _Graphed:
    """A step loop captured in a CUDA graph over static buffers (GPU only)."""

    def __init__(self, loop, launch: _Launch, static: dict[str, Tensor]):
        self.static = static
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up run: compiles the kernels outside the capture
            loop(launch, static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (autograd's, say) do not void the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            loop(launch, static)

    def __call__(self, inputs: dict[str, Tensor], fill=None) -> dict[str, Tensor]:
        for name, value in inputs.items():
            self.static[name].copy_(value)
        if fill is not None:
            fill(self.static)
        self.graph.replay()
        return self.static


# Measured on an H200 (benchmarks/results/tune_triton_cuda.md, depth 2): against direct launches
# (each with its configuration, see _measured_blocks) graphs cut the forward step 1.3-4.1x in 16-bit
# and 1.9-3.8x in float32 up to (B, H) = (128, 512); in float32 at (128, 1024) and (256, 1024) they
# were 2-4% slower, which one limit for every dtype accepts. Beyond (256, 1024) nothing was measured.
AUTO_GRAPH_MAX_BATCH_HIDDEN = 256 * 1024
AUTO_GRAPH_MEMORY_SHARE = 8  # auto graphs' static buffers take at most 1/8 of device memory
_MAX_GRAPHS = 16
_MAX_SEEN = 64

_GRAPHS: OrderedDict[tuple, _Graphed] = OrderedDict()  # least recently used first
_SEEN: OrderedDict[tuple, None] = OrderedDict()  # keys run once without a graph (auto mode)
_EVICTED: OrderedDict[tuple, None] = OrderedDict()  # keys whose graph was evicted: not recaptured
_LOCK = threading.Lock()
_auto_failure: str | None = None  # why an automatic capture failed (none is tried again)


def cuda_graph_count() -> int:
    """How many captured step loops are cached."""
    return len(_GRAPHS)


def clear_cuda_graphs() -> None:
    """Release every cached CUDA graph and its static buffers; shapes must repeat again to be
    captured anew."""
    with _LOCK:
        _GRAPHS.clear()
        _SEEN.clear()
        _EVICTED.clear()


def _capture_stream(bufs: dict[str, Tensor]) -> torch.cuda.Stream | None:
    """The current CUDA stream of the buffers' device; None where no graph can be captured (not
    CUDA, or inside another capture, which then records the loop's launches itself)."""
    device = bufs["gates"].device
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.current_stream(device)


def _graph_budget(device: torch.device) -> int:
    """Bytes that automatic graphs' static buffers may hold together: a share of the device's
    memory, and of what is free now at most half."""
    held = sum(_nbytes(g.static) for g in _GRAPHS.values())
    free = torch.cuda.mem_get_info(device)[0]
    share = torch.cuda.get_device_properties(device).total_memory // AUTO_GRAPH_MEMORY_SHARE
    return min(share, held + free // 2)


def _nbytes(bufs: dict[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in bufs.values())


def _graph_for(loop, launch: _Launch, bufs: dict[str, Tensor], fill, write_only) -> _Graphed | None:
    """The cached graph of this call's key, or one captured now, or None: run directly."""
    stream = _capture_stream(bufs)
    if stream is None or launch.cfg.cuda_graph is False:
        return None
    auto = launch.cfg.cuda_graph is None
    device = bufs["gates"].device
    key = (loop.__name__, device, stream, launch,
           *((name, tuple(v.shape), v.dtype) for name, v in sorted(bufs.items())))  # fmt: skip
    with _LOCK:
        if key in _GRAPHS:
            _GRAPHS.move_to_end(key)
            return _GRAPHS[key]
        if auto and not _auto_captures_now(key, launch, _nbytes(bufs), device):
            return None
        static = {name: torch.zeros_like(v) for name, v in bufs.items()}
        for name, v in bufs.items():
            if name not in write_only:
                static[name].copy_(v)
        fill(static)
        try:
            graphed = _Graphed(loop, launch, static)
        except Exception as err:
            if not auto:
                raise
            _give_up_automatic_graphs(f"{type(err).__name__}: {err}")
            return None
        _SEEN.pop(key, None)
        _GRAPHS[key] = graphed
        while len(_GRAPHS) > _MAX_GRAPHS:
            _evict_oldest()
        return graphed


def _auto_captures_now(key: tuple, launch: _Launch, size: int, device: torch.device) -> bool:
    """Whether auto mode captures this loop now (``size``: bytes of its static buffers): not at a
    key's first sighting, nor where graphs measured no faster; least recently used graphs are
    evicted to keep within the memory budget."""
    if _auto_failure or launch.batch * launch.hidden > AUTO_GRAPH_MAX_BATCH_HIDDEN:
        return False
    if key in _EVICTED:  # more loops alternate than fit: capturing again would thrash
        return False
    if key not in _SEEN:  # shapes that never repeat are not captured
        _SEEN[key] = None
        while len(_SEEN) > _MAX_SEEN:
            _SEEN.popitem(last=False)
        return False
    budget = _graph_budget(device)
    if size > budget:
        return False
    while _GRAPHS and size + sum(_nbytes(g.static) for g in _GRAPHS.values()) > budget:
        _evict_oldest()
    return True


def _evict_oldest() -> None:
    """Drop the least recently used graph; auto mode does not capture its key again."""
    key, _ = _GRAPHS.popitem(last=False)
    _EVICTED[key] = None
    while len(_EVICTED) > _MAX_SEEN:
        _EVICTED.popitem(last=False)


def _give_up_automatic_graphs(reason: str) -> None:
    global _auto_failure
    _auto_failure = reason
    warnings.warn(
        f"nestrnn: capturing a CUDA graph failed ({reason}); the Triton step loops run without "
        "graphs from now on", RuntimeWarning, stacklevel=3,
    )  # fmt: skip


def _run(
    loop,
    launches: _Launches,
    bufs: dict[str, Tensor],
    outputs: tuple[str, ...],
    fill: Callable[[dict[str, Tensor]], None],
    write_only: tuple[str, ...],
) -> dict[str, Tensor]:
    """Run a step loop directly, or through a CUDA graph (see the module docstring), with the
    launch parameters chosen for each (``launches``).

    ``bufs`` holds every tensor the loop touches; ``fill(bufs)`` writes values into parts of buffers
    (the initial state slots). In graph mode every buffer not named in ``write_only`` (what the
    loop only writes, or what ``fill`` writes) is copied into the graph's static twin, ``fill`` is
    applied to the static buffers, and ``outputs`` are cloned out (the static buffers are reused
    by the next call). A buffer read and written, like the gates that come in holding the input
    projection, is both copied in and cloned out.
    """
    graphed = _graph_for(loop, launches.graphed, bufs, fill, write_only)
    if graphed is None:
        fill(bufs)
        capturing = bufs["gates"].is_cuda and torch.cuda.is_current_stream_capturing()
        loop(launches.graphed if capturing else launches.direct, bufs)  # in another's capture
        return bufs
    static = graphed({name: v for name, v in bufs.items() if name not in write_only}, fill)
    return {**bufs, **{name: static[name].clone() for name in outputs}}


# ---------------------------------------------------------------------------------------------------
# the implementation's two phases


def _bias(lw: LevelWeights) -> Tensor | None:
    biases = [b.float() for b in (lw.bias_ih, lw.bias_hh) if b is not None]
    return None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]


def _weights(levels: list[LevelWeights]) -> dict[str, Tensor]:
    """``w_hh0`` (4H, H) and per level k >= 1 ``w{k}`` = [W_ih | W_hh] (4H, 2H)."""
    bufs = {"w_hh0": levels[0].weight_hh.contiguous()}
    for k, lw in enumerate(levels[1:], start=1):
        bufs[f"w{k}"] = torch.cat([lw.weight_ih, lw.weight_hh], dim=1)
    return bufs


def _biases(levels: list[LevelWeights], has_bias: bool) -> dict[str, Tensor]:
    """Per level k >= 1 ``bias{k}`` = b_ih + b_hh (4H,) fp32, zeros where the level has none
    (one zero when no level has any: the kernel then reads none). Only the forward reads them."""
    bufs = {}
    for k, lw in enumerate(levels[1:], start=1):
        bias = _bias(lw)
        if bias is None:
            size = lw.weight_hh.shape[0] if has_bias else 1
            bias = torch.zeros(size, dtype=torch.float32, device=lw.weight_hh.device)
        bufs[f"bias{k}"] = bias
    return bufs


class _Launches(NamedTuple):
    """A call's launch parameters for its step loop launched directly and run in a CUDA graph."""

    direct: _Launch
    graphed: _Launch

    @property
    def cublas(self) -> bool:
        return self.direct.cublas or self.graphed.cublas

    @property
    def op_copy(self) -> bool:
        return self.direct.op_copy or self.graphed.op_copy


def _launches(
    x: Tensor,
    levels: list[LevelWeights],
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    config: TritonConfig | None,
) -> _Launches:
    steps, batch = x.shape[0], x.shape[1]
    hidden = levels[0].weight_hh.shape[1]
    has_bias = any(lw.bias_ih is not None or lw.bias_hh is not None for lw in levels[1:])
    direct = _Launch(steps, batch, hidden, tuple(activations), bool(reverse),
                     batch_sizes is not None, has_bias, pick_config(batch, hidden, config, x.dtype),
                     _dot_precision(x.dtype), x.dtype)  # fmt: skip
    graphed_cfg = pick_config(batch, hidden, config, x.dtype, graphed=True)
    return _Launches(direct, replace(direct, cfg=graphed_cfg))


def _batch_sizes(batch_sizes: Tensor | None, device: torch.device) -> Tensor:
    if batch_sizes is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return batch_sizes.to(device=device, dtype=torch.int32)


def forward(
    x: Tensor,
    levels: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    save: bool,
    config: TritonConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Saved | None]:
    """The whole forward: output (T, B, H), h_n, c_n in x's dtype and, with ``save``, ``Saved``."""
    launches = _launches(x, levels, batch_sizes, reverse, activations, config)
    m = launches.direct
    T, B, H, D = m.steps, m.batch, m.hidden, m.depth
    first, last = state_slots(T, reverse)
    saved = empty_saved(T, B, H, D, x.dtype, x.device, m.packed)
    # the input projection, computed in x's dtype, straight into level 0's fp32 gates
    projection = saved.gates[0].view(T * B, 4 * H)
    x2, w_ih0 = x.reshape(T * B, -1), levels[0].weight_ih.t()
    if x.dtype == projection.dtype:
        torch.matmul(x2, w_ih0, out=projection)
    else:
        projection.copy_(torch.matmul(x2, w_ih0))
    bias0 = _bias(levels[0])
    if bias0 is not None:
        projection.add_(bias0)
    bufs = {
        **saved._asdict(),
        "h": torch.empty((T + 1, B, H), dtype=x.dtype, device=x.device),
        "y": torch.empty((T, B, H), dtype=x.dtype, device=x.device),
        "bs": _batch_sizes(batch_sizes, x.device),
        **_weights(levels),
        **_biases(levels, m.has_bias),
        **_gemm_buffers(launches, x.device, {"g": (B, 4 * H)}),
    }

    def fill(b: dict[str, Tensor]) -> None:  # the initial state slots
        b["h"][first] = h0
        b["cells"][:, first] = c0

    written = ("cells", "act_cells", "inputs", "h", "y")
    bufs = _run(_forward_loop, launches, bufs, ("gates", *written), fill, (*written, "g"))
    h_n = bufs["h"][last].clone()
    c_n = bufs["cells"][:, last].to(x.dtype, copy=True)
    saved = Saved(bufs["gates"], bufs["cells"], bufs["act_cells"], bufs["inputs"])
    return bufs["y"], h_n, c_n, saved if save else None


def backward(
    saved: Saved,
    levels: list[LevelWeights],
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    config: TritonConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reverse time loop: gate gradients ``dz`` (D, T, B, 4H) fp32, and those of h0, c0."""
    launches = _launches(d_out, levels, batch_sizes, reverse, activations, config)
    m = launches.direct
    T, B, H, D = m.steps, m.batch, m.hidden, m.depth
    bufs = {
        **saved._asdict(),
        "dA": torch.empty((D, T, B, 4 * H), dtype=torch.float32, device=d_out.device),
        "dh": torch.empty((B, H), dtype=torch.float32, device=d_out.device),
        "dc": torch.empty((D, B, H), dtype=torch.float32, device=d_out.device),
        "dy": d_out.contiguous(),
        "bs": _batch_sizes(batch_sizes, d_out.device),
        **_weights(levels),  # the backward kernels read no bias
        **_gemm_buffers(launches, d_out.device, {"g_h": (B, H), "g_x": (B, 2 * H)}),
        "dA_op": torch.empty(
            (D, B, 4 * H) if launches.op_copy else (1,), dtype=m.dtype, device=d_out.device
        ),
    }

    def fill(b: dict[str, Tensor]) -> None:  # gradients flowing into the final state
        b["dh"].copy_(d_hn)
        b["dc"].copy_(d_cn)

    written = ("dA", "dh", "dc")
    bufs = _run(_backward_loop, launches, bufs, written, fill, (*written, "g_h", "g_x", "dA_op"))
    dA, dh = bufs["dA"], bufs["dh"]
    # h0 feeds the first step processed: the loop stops before multiplying that step's gates back
    first = T - 1 if reverse else 0
    dh0 = dA[0, first].mm(levels[0].weight_hh.float())
    if m.packed:
        active = torch.arange(B, device=dh.device) < bufs["bs"][first].long()
        dh0 = torch.where(active[:, None], dh0, dh)
    return dA, dh0, bufs["dc"]
