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

Zoneout (``zoneout=``, keep weights (D+1, T, B, H) of the cells and h): the kernels' constexpr
ZONEOUT reads them through their strides (the expanded rate of evaluation too) and mixes what is
carried and output; without it the kernels are exactly those without zoneout and no buffer is
added. In a CUDA graph the weights are an input, copied into the graph's (contiguous) static twin.

Layer normalisation (``norms=``, per level None or (gamma_gates, beta_gates, gamma_cell,
beta_cell), docs/design.md): the kernels' constexpr NORMS (bit k: level k) normalises each gate
block of level k and the cell it outputs; without it the kernels are exactly those without LN
and no buffer is added. A program then holds whole rows (``triton_configs.whole_rows``) and
reduces them in registers. The forward saves the normalised values and 1/std (``Saved``'s LN
fields), the backward the gradients of LN's outputs, from which the parameters' gradients are summed after
the loop.

Inputs: float32, float16 or bfloat16 (the saved state is fp32, the level inputs stay in the input
dtype as GEMM operands).

Launch parameters (``TritonConfig``, chosen by ``pick_config``) are ``triton_configs.py``'s, the
CUDA graphs the loops may run in ``triton_graphs.py``'s.

cuBLAS GEMMs (``TritonConfig.cublas_gemms``): before each launch ``torch.mm`` computes the step's
GEMM into a small buffer (``g``; ``g_h``, ``g_x`` backward) and the kernel adds it instead of running
its own dot; in half precision the backward kernels also write the gate gradients in the input
dtype (``dA_op``), the next GEMM's operand. Each call has two launch configurations
(``_Launches``): one for a loop run in a CUDA graph, one for a loop launched directly
(``pick_config``'s ``graphed``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from nestrnn.activations import activation_code
from nestrnn.ops.common.levels import LevelActivations, LevelWeights
from nestrnn.ops.nested_lstm.layout import Saved, empty_saved, state_slots
from nestrnn.ops.nested_lstm.triton_configs import (
    TritonConfig,
    cuda_graph_setting,
    pick_config,
    whole_rows,
)
from nestrnn.ops.nested_lstm.triton_graphs import clear_cuda_graphs, cuda_graph_count
from nestrnn.ops.nested_lstm.triton_graphs import run as _run
from nestrnn.ops.nested_lstm.triton_kernels import (
    LAUNCH_ERRORS,
    bwd_inner_kernel,
    bwd_level_kernel,
    fwd_nested_kernel,
    fwd_outer_kernel,
)

__all__ = [
    "LAUNCH_ERRORS",
    "TritonConfig",
    "backward",
    "clear_cuda_graphs",
    "cuda_graph_count",
    "cuda_graph_setting",
    "forward",
    "pick_config",
]


#: the parameters of one level's layer normalisation: gamma_gates (4H,), beta_gates (4H,),
#: gamma_cell (H,), beta_cell (H,)
Norm = tuple[Tensor, Tensor, Tensor, Tensor]


#: ``Saved``'s layer-normalisation fields, buffers of the loops only with LN
NORM_FIELDS = ("norm_gates", "norm_cells", "inv_std")


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
    zoneout: bool = False  # the kernels read keep weights (ZONEOUT); without, today's kernels
    norms: int = 0  # bit k: level k is layer-normalised (NORMS); 0: today's kernels

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
            ZONEOUT=self.zoneout,
            NORMS=self.norms,
            num_warps=self.cfg.num_warps,
            **stages,
        )

    def slots(self, s: int) -> tuple[int, int]:
        """Time index of processing step ``s`` and the state slot before it (``_slots``)."""
        return (self.steps - 1 - s, self.steps - s) if self.reverse else (s, s)

    def zoneout_args(self, b: dict[str, Tensor]) -> tuple:
        """The kernels' keep-weight arguments: the buffer and its element strides along levels,
        time and rows. Without zoneout the kernels read none: any pointer, no new buffer."""
        if not self.zoneout:
            return (b["bs"], 0, 0, 0)
        zoneout = b["zoneout"]
        return (zoneout, zoneout.stride(0), zoneout.stride(1), zoneout.stride(2))

    def norm_args(self, b: dict[str, Tensor], backward: bool) -> tuple:
        """The kernels' layer-normalisation buffers: the parameters, the normalised gates and
        cells, 1/std and, backward, the gradients of LN's outputs. Without LN any pointer."""
        names: tuple[str, ...] = ("norms", *NORM_FIELDS)
        names += ("d_norm_gates", "d_norm_cells") if backward else ()
        return tuple(b[name] if self.norms else b["bs"] for name in names)

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
    zo, ln = m.zoneout_args(b), m.norm_args(b, backward=False)
    for s in range(T):
        t, prev = m.slots(s)
        if m.cublas:  # the kernels read the step's GEMM from b["g"]
            _gemm(b["h"][prev], b["w_hh0"].t(), b["g"])
        fwd_outer_kernel[grid](
            b["gates"],
            b["h"],
            b["w_hh0"],
            b["cells"],
            b["act_cells"],
            b["inputs"],
            b["y"],
            b["bs"],
            b["g"],
            s,
            T,
            B,
            H,
            *zo,
            *ln,
            DEPTH=D,
            GATE_ACT=gate[0],
            CAND_ACT=cand[0],
            CELL_ACTS=cells,
            **kw,
        )
        for k in range(1, D):
            if m.cublas:
                _gemm(b["inputs"][k - 1, t], b[f"w{k}"].t(), b["g"])
            fwd_nested_kernel[grid](
                b["gates"],
                b["inputs"],
                b[f"w{k}"],
                b[f"bias{k}"],
                b["cells"],
                b["act_cells"],
                b["h"],
                b["y"],
                b["bs"],
                b["g"],
                s,
                T,
                B,
                H,
                *zo,
                *ln,
                LEVEL=k,
                DEPTH=D,
                GATE_ACT=gate[k],
                CAND_ACT=cand[k],
                CELL_ACTS=cells,
                HAS_BIAS=m.has_bias,
                **kw,
            )


def _backward_loop(m: _Launch, b: dict[str, Tensor]) -> None:
    grid, kw, T, B, H, D = m.grid(), m.consts(), m.steps, m.batch, m.hidden, m.depth
    gate, cand = m.level_codes("gate"), m.level_codes("candidate")
    gate_acts, cand_acts, cell_acts = m.codes("gate"), m.codes("candidate"), m.codes("cell")
    dA, op = b["dA"], b["dA_op"]
    zo, ln = m.zoneout_args(b), m.norm_args(b, backward=True)
    for s in range(T - 1, -1, -1):
        t, _prev = m.slots(s)
        if m.cublas and s + 1 < T:  # dh = dA^0 of the step processed before @ W_hh^0
            t_next = t - 1 if m.reverse else t + 1
            _gemm(op[0] if m.op_copy else dA[0, t_next], b["w_hh0"], b["g_h"])
        bwd_inner_kernel[grid](
            dA,
            b["w_hh0"],
            b["dh"],
            b["dc"],
            b["dy"],
            b["gates"],
            b["cells"],
            b["act_cells"],
            b["bs"],
            b["g_h"],
            op,
            s,
            T,
            B,
            H,
            *zo,
            *ln,
            DEPTH=D,
            GATE_ACTS=gate_acts,
            CAND_ACTS=cand_acts,
            CELL_ACTS=cell_acts,
            OP_COPY=m.op_copy,
            **kw,
        )
        for k in range(D - 2, -1, -1):
            if m.cublas:  # [dx~ | dh~] = dA^{k+1} @ [W_ih | W_hh] of level k+1
                _gemm(op[k + 1] if m.op_copy else dA[k + 1, t], b[f"w{k + 1}"], b["g_x"])
            bwd_level_kernel[grid](
                dA,
                b[f"w{k + 1}"],
                b["dc"],
                b["gates"],
                b["cells"],
                b["bs"],
                b["g_x"],
                op,
                s,
                T,
                B,
                H,
                *zo,
                *ln,
                LEVEL=k,
                GATE_ACT=gate[k],
                CAND_ACT=cand[k],
                OP_COPY=m.op_copy,
                **kw,
            )


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
    zoneout: Tensor | None = None,
    norms: Sequence[Norm | None] | None = None,
) -> _Launches:
    steps, batch = x.shape[0], x.shape[1]
    hidden = levels[0].weight_hh.shape[1]
    has_bias = any(lw.bias_ih is not None or lw.bias_hh is not None for lw in levels[1:])
    direct = _Launch(
        steps,
        batch,
        hidden,
        tuple(activations),
        bool(reverse),
        batch_sizes is not None,
        has_bias,
        pick_config(batch, hidden, None, x.dtype),
        _dot_precision(x.dtype),
        x.dtype,
        zoneout is not None,
        sum(1 << k for k, norm in enumerate(norms or ()) if norm is not None),
    )
    graphed_cfg = pick_config(batch, hidden, None, x.dtype, graphed=True)
    if direct.norms:  # the kernels reduce whole rows
        direct = replace(direct, cfg=whole_rows(direct.cfg, hidden))
        graphed_cfg = whole_rows(graphed_cfg, hidden)
    return _Launches(direct, replace(direct, cfg=graphed_cfg))


def _batch_sizes(batch_sizes: Tensor | None, device: torch.device) -> Tensor:
    if batch_sizes is None:
        return torch.zeros(1, dtype=torch.int32, device=device)
    return batch_sizes.to(device=device, dtype=torch.int32)


def _zoneout(zoneout: Tensor | None) -> dict[str, Tensor]:
    """The keep weights as the kernels read them (any float dtype, any strides but along units,
    the expanded rate of evaluation included); no buffer without zoneout."""
    if zoneout is None:
        return {}
    return {"zoneout": zoneout if zoneout.stride(-1) == 1 else zoneout.contiguous()}


def _norms(
    norms: Sequence[Norm | None] | None, depth: int, hidden: int, device
) -> dict[str, Tensor]:
    """The LN parameters as the kernels read them, (D, 10H) fp32: per level [gamma_gates |
    beta_gates | gamma_cell | beta_cell] (zeros for a level without); no buffer without LN."""
    if norms is None or all(norm is None for norm in norms):
        return {}
    if len(norms) != depth:
        raise ValueError(f"norms has {len(norms)} entries for {depth} levels")
    sizes = (4 * hidden, 4 * hidden, hidden, hidden)
    for k, norm in enumerate(norms):
        if norm is not None and tuple(p.numel() for p in norm) != sizes:
            got = [tuple(p.shape) for p in norm]
            raise ValueError(f"level {k}'s LN parameters must have {sizes} elements, got {got}")
    rows = [
        torch.zeros(10 * hidden, dtype=torch.float32, device=device)
        if norm is None
        else torch.cat([p.reshape(-1).float() for p in norm])
        for norm in norms
    ]
    return {"norms": torch.stack(rows)}


def _saved_buffers(saved: Saved, m: _Launch) -> dict[str, Tensor]:
    """``saved``'s fields as the loops' buffers (those of LN only with LN)."""
    return {k: v for k, v in saved._asdict().items() if m.norms or k not in NORM_FIELDS}


def _norm_fields(m: _Launch) -> tuple[str, ...]:
    return NORM_FIELDS if m.norms else ()


def forward(
    x: Tensor,
    levels: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    save: bool,
    zoneout: Tensor | None = None,
    norms: Sequence[Norm | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Saved | None]:
    """The whole forward: output (T, B, H), h_n, c_n in x's dtype and, with ``save``, ``Saved``.

    ``zoneout``: keep-previous weights (D+1, T, B, H) of the cells and h, or None (no zoneout:
    the kernels without it); ``Saved.cells`` then holds the carried (mixed) cells.
    ``norms``: per level None or its LN parameters (gamma_gates, beta_gates, gamma_cell,
    beta_cell), or None; with LN at some level ``Saved``'s normalisation fields are filled (fp32),
    which ``backward`` needs."""
    launches = _launches(x, levels, batch_sizes, reverse, activations, zoneout, norms)
    m = launches.direct
    T, B, H, D = m.steps, m.batch, m.hidden, m.depth
    first, last = state_slots(T, reverse)
    saved = empty_saved(T, B, H, D, x.dtype, x.device, m.packed, normalised=bool(m.norms))
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
        **_saved_buffers(saved, m),
        "h": torch.empty((T + 1, B, H), dtype=x.dtype, device=x.device),
        "y": torch.empty((T, B, H), dtype=x.dtype, device=x.device),
        "bs": _batch_sizes(batch_sizes, x.device),
        **_zoneout(zoneout),
        **_norms(norms, D, H, x.device),
        **_weights(levels),
        **_biases(levels, m.has_bias),
        **_gemm_buffers(launches, x.device, {"g": (B, 4 * H)}),
    }

    def fill(b: dict[str, Tensor]) -> None:  # the initial state slots
        b["h"][first] = h0
        b["cells"][:, first] = c0

    written = ("cells", "act_cells", "inputs", "h", "y", *_norm_fields(m))
    bufs = _run(_forward_loop, launches, bufs, ("gates", *written), fill, (*written, "g"))
    h_n = bufs["h"][last].clone()
    c_n = bufs["cells"][:, last].to(x.dtype, copy=True)
    saved = Saved(**{name: bufs.get(name, getattr(saved, name)) for name in Saved._fields})
    return bufs["y"], h_n, c_n, saved if save else None


def _norm_grads(
    bufs: dict[str, Tensor], norms: Sequence[Norm | None] | None
) -> list[tuple[Tensor, Tensor, Tensor, Tensor] | None]:
    """Per level the gradients of (gamma_gates, beta_gates, gamma_cell, beta_cell), fp32, or
    None: sums over steps and rows of what the backward kernels stored (the gradients of LN's
    outputs, zero in inactive rows) times the saved normalised values."""
    grads: list[tuple[Tensor, Tensor, Tensor, Tensor] | None] = []
    for k, norm in enumerate(norms or ()):
        if norm is None:
            grads.append(None)
            continue
        d_gates, d_cells = bufs["d_norm_gates"][k], bufs["d_norm_cells"][k]
        grads.append(
            (
                (d_gates * bufs["norm_gates"][k]).sum((0, 1)),
                d_gates.sum((0, 1)),
                (d_cells * bufs["norm_cells"][k]).sum((0, 1)),
                d_cells.sum((0, 1)),
            )
        )
    return grads


def backward(
    saved: Saved,
    levels: list[LevelWeights],
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    zoneout: Tensor | None = None,
    norms: Sequence[Norm | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, list]:
    """The reverse time loop: gate gradients ``dz`` (D, T, B, 4H) fp32, and those of h0, c0.
    ``zoneout``: the forward's keep weights, or None.

    ``norms``: the forward's LN parameters, or None. With LN at some level ``saved`` must be the
    forward's ``Saved`` with its normalisation fields, ``dz`` is the gradient of the gate
    pre-activations before LN (what the weight GEMMs need), and a fourth result follows: per level None or the fp32 gradients of
    (gamma_gates, beta_gates, gamma_cell, beta_cell), summed after the loop. Without LN the
    result is the three tensors, as before."""
    launches = _launches(d_out, levels, batch_sizes, reverse, activations, zoneout, norms)
    m = launches.direct
    T, B, H, D = m.steps, m.batch, m.hidden, m.depth
    bufs = {
        **_saved_buffers(saved, m),
        "dA": torch.empty((D, T, B, 4 * H), dtype=torch.float32, device=d_out.device),
        "dh": torch.empty((B, H), dtype=torch.float32, device=d_out.device),
        "dc": torch.empty((D, B, H), dtype=torch.float32, device=d_out.device),
        "dy": d_out.contiguous(),
        "bs": _batch_sizes(batch_sizes, d_out.device),
        **_zoneout(zoneout),
        **_norms(norms, D, H, d_out.device),
        **_norm_grad_buffers(m, d_out.device),
        **_weights(levels),  # the backward kernels read no bias
        **_gemm_buffers(launches, d_out.device, {"g_h": (B, H), "g_x": (B, 2 * H)}),
        "dA_op": torch.empty(
            (D, B, 4 * H) if launches.op_copy else (1,), dtype=m.dtype, device=d_out.device
        ),
    }

    def fill(b: dict[str, Tensor]) -> None:  # gradients flowing into the final state
        b["dh"].copy_(d_hn)
        b["dc"].copy_(d_cn)

    if m.norms and not saved.normalised():
        raise ValueError("a backward with layer normalisation needs the forward's normalised Saved")
    written = ("dA", "dh", "dc", *_norm_grad_names(m))
    bufs = _run(_backward_loop, launches, bufs, written, fill, (*written, "g_h", "g_x", "dA_op"))
    dA, dh = bufs["dA"], bufs["dh"]
    # h0 feeds the first step processed: the loop stops before multiplying that step's gates back
    first = T - 1 if reverse else 0
    dh0 = dA[0, first].mm(levels[0].weight_hh.float())
    if m.zoneout:  # the kept share of h's gradient, left in dh by the last launch
        dh0 += dh
    if m.packed:
        active = torch.arange(B, device=dh.device) < bufs["bs"][first].long()
        dh0 = torch.where(active[:, None], dh0, dh)
    if m.norms:
        return dA, dh0, bufs["dc"], _norm_grads(bufs, norms)
    return dA, dh0, bufs["dc"]


def _norm_grad_names(m: _Launch) -> tuple[str, ...]:
    return ("d_norm_gates", "d_norm_cells") if m.norms else ()


def _norm_grad_buffers(m: _Launch, device: torch.device) -> dict[str, Tensor]:
    """The backward's LN buffers: the gradients of the normalised gates and cells (after gamma
    and beta), zeroed (levels without LN are never written); none without LN."""
    T, B, H, D = m.steps, m.batch, m.hidden, m.depth
    shapes = {"d_norm_gates": (D, T, B, 4 * H), "d_norm_cells": (D, T, B, H)}
    return {
        name: torch.zeros(shape, dtype=torch.float32, device=device)
        for name, shape in shapes.items()
        if m.norms
    }
