"""Triton kernels of the op (one time step, one level per launch), driven by ``triton_loop.py``.

Imported only by ``triton_loop.py`` and ``triton_graphs.py``, which the op imports lazily: importing ``nestrnn`` never
imports Triton. Every kernel runs on a 2-D grid ``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))``: a program
owns BLOCK_B batch rows and BLOCK_H whole hidden units, i.e. all four gates (i, f, g, o) of those
units, so the pointwise math runs in the GEMM's epilogue without a round trip through memory.

Buffers (contiguous; T steps, B rows, H units, D levels), ``layout.Saved`` plus the h slots:

    gates      (D, T, B, 4H)    fp32   gates i, f, g, o; level 0 holds x W_ih^T + b on entry
    cells      (D, T+1, B, H)   fp32   cells by slot: slot t / t+1 around step t (forward), t+1 / t
                                       (reverse), so the initial state is slot 0 / T
    act_cells  (D, T, B, H)     fp32   cell activation of each new cell
    inputs     (D-1, T, B, 2H)  operand  [x~ | h~] of level k, the input of level k+1
    h          (T+1, B, H)      dtype  outer hidden state, same slots as ``cells``
    dA         (D, T, B, 4H)    fp32   gradients of the gate pre-activations (backward)
    dh (B, H), dc (D, B, H)     fp32   gradients carried into h and the cells (backward)
    g (B, 4H); (B, H), (B, 2H)  fp32*  the step's GEMM by cuBLAS, forward; backward dh, [dx~|dh~]
    dA_op      (D, B, 4H)       dtype  the step's gate gradients again, the next GEMM's operand
    zoneout    (D+1, T, B, H)   any float  keep-previous weights of the cells and h (read with
                                       element strides ``zo_sk, zo_st, zo_sb``; units contiguous)
    ln         (D, 10H)         fp32   LN parameters per level: gamma_gates, beta_gates (4H each),
                                       gamma_cell, beta_cell (H each)
    nz, nc     (D, T, B, 4H), (D, T, B, H)  fp32  the gates' pre-activations and the new cells
                                       normalised (before gamma, beta); forward writes them
    rs         (D, T, B, 5)     fp32   1/std of each row's i, f, g, o blocks and of its new cell
    dnz, dnc   like nz, nc      fp32   gradients of LN's outputs (backward writes them; the loop
                                       sums the parameters' gradients from them)

With the constexpr CUBLAS the kernels add the step's GEMM from ``g`` (torch.mm wrote it just
before the launch; * in the operands' dtype where torch cannot give a float32 result) instead of
running their own ``tl.dot``; with OP_COPY (half precision) the backward kernels also write
``dA_op``. With the constexpr ZONEOUT the carried cells and h (and the output) are mixed with
their previous values by the ``zoneout`` weights, and the backward splits their gradients
accordingly; without it the kernels are exactly those of the op without zoneout. With the
constexpr NORMS (bit k: level k) each gate block of level k is layer-normalised before its
activation and level k's output reads LN(c^k) (the carried cell stays unnormalised); the row
statistics are reduced in registers, so a program must hold whole rows (BLOCK_H >= H, one program
along H: ``triton_configs.whole_rows``). NORMS == 0 compiles to the kernels without LN.

Matmul operands are in the weights' dtype with fp32 accumulation; state and gate math are fp32.
``s`` is the processing-order step and ``T`` the sequence length; neither is specialised on.
Activations are constexpr codes (``nestrnn.activations.ACTIVATION_TABLE``); a kernel that
needs every level's code gets them packed 4 bits a level (``triton_loop.pack_codes``). Only plain
pointer arithmetic is used (no block pointers, no autotuning), so the kernels run on Triton 3.6 to
3.9 and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.errors import TritonError

#: what compiling or launching these kernels raises where they cannot run on this GPU: Triton's
#: own errors (CompilationError, OutOfResources, PTXASError...) and the driver's (RuntimeError,
#: torch.AcceleratorError among them); anything else is a bug of ours and must not be taken for one
LAUNCH_ERRORS = (TritonError, RuntimeError)

# ---------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _act(x, CODE: tl.constexpr):
    """Activation ``CODE`` of ``x``: sigmoid, tanh, identity, relu, hardtanh, softsign."""
    if CODE == 0:
        y = 1.0 / (1.0 + tl.exp(-x))
    elif CODE == 1:
        y = 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0  # one exp; saturates cleanly at both ends
    elif CODE == 2:
        y = x
    elif CODE == 3:
        y = tl.maximum(x, 0.0)
    elif CODE == 4:
        y = tl.minimum(tl.maximum(x, -1.0), 1.0)
    else:
        y = x / (1.0 + tl.abs(x))
    return y


@triton.jit
def _act_grad(y, CODE: tl.constexpr):
    """The derivative of activation ``CODE``, in terms of its output ``y``."""
    if CODE == 0:
        d = y * (1.0 - y)
    elif CODE == 1:
        d = 1.0 - y * y
    elif CODE == 2:
        d = tl.full(y.shape, 1.0, tl.float32)
    elif CODE == 3:
        d = tl.where(y > 0.0, 1.0, 0.0)
    elif CODE == 4:
        d = tl.where((y > -1.0) & (y < 1.0), 1.0, 0.0)
    else:
        d = (1.0 - tl.abs(y)) * (1.0 - tl.abs(y))
    return d


@triton.jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows and units, their masks, and the (rows, units) mask."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    umask = units < H
    return rows, units, rmask, umask, rmask[:, None] & umask[None, :]


@triton.jit
def _slots(s, T, REVERSE: tl.constexpr):
    """Time index of processing step ``s`` and the state slots before and after it (int64)."""
    s = s.to(tl.int64)
    if REVERSE:
        t = T - 1 - s
        prev = t + 1
        new = t
    else:
        t = s
        prev = s
        new = s + 1
    return t, prev, new


@triton.jit
def _active(bs_ptr, t, rows, B, HAS_BS: tl.constexpr):
    """(BLOCK_B, 1) mask of the rows active at time ``t`` (packed batches: rows < bs[t])."""
    if HAS_BS:  # noqa: SIM108 (a constexpr branch, not a runtime select)
        n = tl.load(bs_ptr + t)
    else:
        n = B
    return (rows < n)[:, None]


@triton.jit
def _matmul_gates(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
    a_ptr,
    a_stride,
    w_ptr,
    rows,
    units,
    rmask,
    umask,
    H,
    K,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """acc_gate += A[rows, :K] @ W[gate * H + units, :K]^T for the four gates.

    ``A`` is row-major with row stride ``a_stride``; ``W`` is (4H, K) row-major (nn.LSTM's layout).
    """
    wdt = w_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * a_stride + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(wdt)
        w_off = units[None, :] * K + ks[:, None]
        wmask = kmask[:, None] & umask[None, :]
        acc_i = tl.dot(
            a, tl.load(w_ptr + w_off, mask=wmask, other=0.0), acc_i, input_precision=DOT_PREC
        )
        acc_f = tl.dot(
            a,
            tl.load(w_ptr + H * K + w_off, mask=wmask, other=0.0),
            acc_f,
            input_precision=DOT_PREC,
        )
        acc_g = tl.dot(
            a,
            tl.load(w_ptr + 2 * H * K + w_off, mask=wmask, other=0.0),
            acc_g,
            input_precision=DOT_PREC,
        )
        acc_o = tl.dot(
            a,
            tl.load(w_ptr + 3 * H * K + w_off, mask=wmask, other=0.0),
            acc_o,
            input_precision=DOT_PREC,
        )
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _add_gemm_gates(acc_i, acc_f, acc_g, acc_o, g_ptr, gtile, H, mask):
    """acc_gate += G[rows, gate * H + units]: the step's GEMM, computed by cuBLAS into ``g_ptr``
    ((B, 4H), fp32 or the operands' dtype)."""
    acc_i += tl.load(g_ptr + gtile, mask=mask, other=0.0).to(tl.float32)
    acc_f += tl.load(g_ptr + gtile + H, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.load(g_ptr + gtile + 2 * H, mask=mask, other=0.0).to(tl.float32)
    acc_o += tl.load(g_ptr + gtile + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _store_grad(dA_ptr, op_ptr, offset, value, mask, OP_COPY: tl.constexpr):
    """Store a gate gradient into ``dA`` (fp32) and, with OP_COPY, into its copy in the weights'
    dtype, the operand of the next cuBLAS GEMM (``op_ptr``: this level's (B, 4H) plane)."""
    tl.store(dA_ptr + offset, value, mask=mask)
    if OP_COPY:
        tl.store(op_ptr + offset, value.to(op_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_state(ptr_new, ptr_prev, val, tile, mask, act, HAS_BS: tl.constexpr):
    """Store a state value; in packed batches inactive rows keep the previous value."""
    if HAS_BS:
        old = tl.load(ptr_prev + tile, mask=mask, other=0.0).to(tl.float32)
        val = tl.where(act, val, old)
    tl.store(ptr_new + tile, val.to(ptr_new.dtype.element_ty), mask=mask)


@triton.jit
def _keep(zo_ptr, k, t, rows, units, zo_sk, zo_st, zo_sb, mask):
    """Zoneout's keep-previous weight of state ``k`` (cell level k; D: h) at time ``t``, in fp32.

    ``zo_ptr`` is (D+1, T, B, H) with element strides ``zo_sk, zo_st, zo_sb`` (any of them 0 for
    the expanded rate of evaluation) and contiguous units; offsets in int64 (``t`` is).
    """
    offset = t * zo_st + (t * 0 + k) * zo_sk + rows[:, None].to(tl.int64) * zo_sb
    return tl.load(zo_ptr + offset + units[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_zoned_state(ptr_new, ptr_prev, val, keep, tile, mask, act):
    """Store the carried state ``keep * previous + (1 - keep) * val`` (zoneout) and return it;
    rows inactive at this step (``act`` false) keep the previous value."""
    old = tl.load(ptr_prev + tile, mask=mask, other=0.0).to(tl.float32)
    val = tl.where(act, keep * old + (1.0 - keep) * val, old)
    tl.store(ptr_new + tile, val.to(ptr_new.dtype.element_ty), mask=mask)
    return val


@triton.jit
def _store_gates(gp, gtile, H, i, f, g, o, mask):
    tl.store(gp + gtile, i, mask=mask)
    tl.store(gp + gtile + H, f, mask=mask)
    tl.store(gp + gtile + 2 * H, g, mask=mask)
    tl.store(gp + gtile + 3 * H, o, mask=mask)


@triton.jit
def _store_level_input(in_ptr, rows, units, H, i, f, g, c_prev, mask, act):
    """[x~ | h~] = [i*g | f*c_prev] of one level (zero in inactive rows, see layout.Saved)."""
    dt = in_ptr.dtype.element_ty
    itile = rows[:, None] * (2 * H) + units[None, :]
    tl.store(in_ptr + itile, tl.where(act, i * g, 0.0).to(dt), mask=mask)
    tl.store(in_ptr + itile + H, tl.where(act, f * c_prev, 0.0).to(dt), mask=mask)


@triton.jit
def _norm(z, tile, stat, n_ptr, rs_ptr, gamma_ptr, beta_ptr, rows, units, rmask, umask, mask, H):
    """Layer normalisation of ``z`` over each row's H units (the program holds whole rows):
    stores the normalised value at ``n_ptr + tile`` and 1/std as column ``stat`` of ``rs_ptr``
    ((B, 5), per row), and returns it scaled by gamma and shifted by beta (biased variance,
    eps 1e-5, as torch's layer_norm)."""
    mean = tl.sum(tl.where(umask[None, :], z, 0.0), axis=1) / H
    centred = tl.where(umask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / H + 1e-5)
    n = centred * rstd[:, None]
    tl.store(n_ptr + tile, n, mask=mask)
    tl.store(rs_ptr + rows * 5 + stat, rstd, mask=rmask)
    gamma = tl.load(gamma_ptr + units, mask=umask, other=0.0)
    beta = tl.load(beta_ptr + units, mask=umask, other=0.0)
    return n * gamma[None, :] + beta[None, :]


@triton.jit
def _norm_grad(d, tile, stat, n_ptr, rs_ptr, dn_ptr, gamma_ptr, rows, units, rmask, umask, mask, H):
    """The gradient of a layer normalisation's input from ``d``, that of its output (zero in
    rows inactive at this step); ``d`` is also stored at ``dn_ptr + tile``, from which the loop
    computes gamma's and beta's gradients. ``n_ptr``, ``rs_ptr``: what ``_norm`` stored."""
    tl.store(dn_ptr + tile, d, mask=mask)
    n = tl.load(n_ptr + tile, mask=mask, other=0.0)
    rstd = tl.load(rs_ptr + rows * 5 + stat, mask=rmask, other=0.0)
    dn = d * tl.load(gamma_ptr + units, mask=umask, other=0.0)[None, :]
    mean_dn = tl.sum(dn, axis=1) / H
    mean_dn_n = tl.sum(dn * n, axis=1) / H
    return rstd[:, None] * (dn - mean_dn[:, None] - n * mean_dn_n[:, None])


@triton.jit
def _norm_gates(
    acc_i, acc_f, acc_g, acc_o, ln_ptr, nz_ptr, rs_ptr, rows, units, rmask, umask, mask, gtile, H
):
    """Each gate block's pre-activations layer-normalised (``_norm``); ``ln_ptr``: the level's
    parameters [gamma_gates | beta_gates | gamma_cell | beta_cell] (10H), ``nz_ptr``, ``rs_ptr``:
    this level's and step's planes of the normalised gates (B, 4H) and of 1/std (B, 5)."""
    H4 = 4 * H
    acc_i = _norm(
        acc_i, gtile, 0, nz_ptr, rs_ptr, ln_ptr, ln_ptr + H4, rows, units, rmask, umask, mask, H
    )
    acc_f = _norm(
        acc_f,
        gtile + H,
        1,
        nz_ptr,
        rs_ptr,
        ln_ptr + H,
        ln_ptr + H4 + H,
        rows,
        units,
        rmask,
        umask,
        mask,
        H,
    )
    acc_g = _norm(
        acc_g,
        gtile + 2 * H,
        2,
        nz_ptr,
        rs_ptr,
        ln_ptr + 2 * H,
        ln_ptr + H4 + 2 * H,
        rows,
        units,
        rmask,
        umask,
        mask,
        H,
    )
    acc_o = _norm(
        acc_o,
        gtile + 3 * H,
        3,
        nz_ptr,
        rs_ptr,
        ln_ptr + 3 * H,
        ln_ptr + H4 + 3 * H,
        rows,
        units,
        rmask,
        umask,
        mask,
        H,
    )
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _ascend(
    c_cur,
    o_cur,
    gates_ptr,
    cells_ptr,
    act_cells_ptr,
    h_ptr,
    y_ptr,
    zo_ptr,
    zo_sk,
    zo_st,
    zo_sb,
    ln_ptr,
    nc_ptr,
    rs_ptr,
    t,
    prev,
    new,
    T,
    B,
    H,
    rows,
    units,
    rmask,
    umask,
    tile,
    gtile,
    mask,
    act,
    LEVEL: tl.constexpr,
    CELL_ACTS: tl.constexpr,
    HAS_BS: tl.constexpr,
    ZONEOUT: tl.constexpr,
    NORMS: tl.constexpr,
):
    """Innermost epilogue: store c^LEVEL, then c^{k-1} = o_k act_k(c^k) up to h = o_0 act_0(c^0).

    ``c_cur`` is the new innermost cell, ``o_cur`` that level's output gate (in registers); the
    output gates of the upper levels are read back from ``gates`` (written by earlier launches).
    ZONEOUT: the ascent runs on the new values; what is stored (carried, and the output) is each
    state mixed with its previous value by its keep weight (state LEVEL + 1 = D is h).
    NORMS (bit k: level k): level k's output is o_k act_k(LN(c^k)) of the new (unmixed) cell.
    """
    plane = B * H
    if ZONEOUT:
        _store_zoned_state(
            cells_ptr + (LEVEL * (T + 1) + new) * plane,
            cells_ptr + (LEVEL * (T + 1) + prev) * plane,
            c_cur,
            _keep(zo_ptr, LEVEL, t, rows, units, zo_sk, zo_st, zo_sb, mask),
            tile,
            mask,
            act,
        )
    else:
        _store_state(
            cells_ptr + (LEVEL * (T + 1) + new) * plane,
            cells_ptr + (LEVEL * (T + 1) + prev) * plane,
            c_cur,
            tile,
            mask,
            act,
            HAS_BS,
        )
    for j in tl.static_range(LEVEL + 1):
        k = LEVEL - j  # the level whose output is produced now
        if (NORMS >> k) & 1:  # the cell carried on unnormalised; LN's statistics saved
            ln_k = ln_ptr + k * (10 * H)
            c_norm = _norm(
                c_cur,
                tile,
                4,
                nc_ptr + (k * T + t) * plane,
                rs_ptr + (k * T + t) * (5 * B),
                ln_k + 8 * H,
                ln_k + 9 * H,
                rows,
                units,
                rmask,
                umask,
                mask,
                H,
            )
            a = _act(c_norm, (CELL_ACTS >> (4 * k)) & 15)
        else:
            a = _act(c_cur, (CELL_ACTS >> (4 * k)) & 15)
        tl.store(act_cells_ptr + (k * T + t) * plane + tile, a, mask=mask)
        up = o_cur * a
        if k > 0:
            if ZONEOUT:
                _store_zoned_state(
                    cells_ptr + ((k - 1) * (T + 1) + new) * plane,
                    cells_ptr + ((k - 1) * (T + 1) + prev) * plane,
                    up,
                    _keep(zo_ptr, k - 1, t, rows, units, zo_sk, zo_st, zo_sb, mask),
                    tile,
                    mask,
                    act,
                )
            else:
                _store_state(
                    cells_ptr + ((k - 1) * (T + 1) + new) * plane,
                    cells_ptr + ((k - 1) * (T + 1) + prev) * plane,
                    up,
                    tile,
                    mask,
                    act,
                    HAS_BS,
                )
            o_cur = tl.load(
                gates_ptr + ((k - 1) * T + t) * (4 * plane) + gtile + 3 * H, mask=mask, other=0.0
            )
            c_cur = up
        else:
            if ZONEOUT:  # the output is the carried h
                up = _store_zoned_state(
                    h_ptr + new * plane,
                    h_ptr + prev * plane,
                    up,
                    _keep(zo_ptr, LEVEL + 1, t, rows, units, zo_sk, zo_st, zo_sb, mask),
                    tile,
                    mask,
                    act,
                )
            else:
                _store_state(h_ptr + new * plane, h_ptr + prev * plane, up, tile, mask, act, HAS_BS)
            y = tl.where(act, up, 0.0)
            tl.store(y_ptr + t * plane + tile, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["s", "T"])
def fwd_outer_kernel(
    gates_ptr,
    h_ptr,
    w_hh_ptr,
    cells_ptr,
    act_cells_ptr,
    inputs_ptr,
    y_ptr,
    bs_ptr,
    g_ptr,
    s,
    T,
    B,
    H,
    zo_ptr,
    zo_sk,
    zo_st,
    zo_sb,
    ln_ptr,
    nz_ptr,
    nc_ptr,
    rs_ptr,
    DEPTH: tl.constexpr,
    GATE_ACT: tl.constexpr,
    CAND_ACT: tl.constexpr,
    CELL_ACTS: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CUBLAS: tl.constexpr,
    ZONEOUT: tl.constexpr,
    NORMS: tl.constexpr,
):
    """Level 0 of step ``s``: gates = (x W_ih^T + b, in ``gates`` already) + h_{t-1} W_hh^T.

    DEPTH == 1: also the cell update and h (a plain LSTM step). DEPTH >= 2: writes level 1's
    input [x~ | h~] = [i*g | f*c^0_{t-1}]. CUBLAS: h_{t-1} W_hh^T is read from ``g_ptr``.
    """
    rows, units, rmask, umask, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    t, prev, new = _slots(s, T, REVERSE)
    plane = B * H
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    act = _active(bs_ptr, t, rows, B, HAS_BS)

    gp = gates_ptr + t * (4 * plane)
    acc_i = tl.load(gp + gtile, mask=mask, other=0.0)
    acc_f = tl.load(gp + gtile + H, mask=mask, other=0.0)
    acc_g = tl.load(gp + gtile + 2 * H, mask=mask, other=0.0)
    acc_o = tl.load(gp + gtile + 3 * H, mask=mask, other=0.0)
    if CUBLAS:
        acc_i, acc_f, acc_g, acc_o = _add_gemm_gates(
            acc_i, acc_f, acc_g, acc_o, g_ptr, gtile, H, mask
        )
    else:
        acc_i, acc_f, acc_g, acc_o = _matmul_gates(
            acc_i,
            acc_f,
            acc_g,
            acc_o,
            a_ptr=h_ptr + prev * plane,
            a_stride=H,
            w_ptr=w_hh_ptr,
            rows=rows,
            units=units,
            rmask=rmask,
            umask=umask,
            H=H,
            K=H,
            BLOCK_K=BLOCK_K,
            DOT_PREC=DOT_PREC,
        )
    if NORMS & 1:
        acc_i, acc_f, acc_g, acc_o = _norm_gates(
            acc_i,
            acc_f,
            acc_g,
            acc_o,
            ln_ptr,
            nz_ptr + t * (4 * plane),
            rs_ptr + t * (5 * B),
            rows,
            units,
            rmask,
            umask,
            mask,
            gtile,
            H,
        )
    i = _act(acc_i, GATE_ACT)
    f = _act(acc_f, GATE_ACT)
    g = _act(acc_g, CAND_ACT)
    o = _act(acc_o, GATE_ACT)
    _store_gates(gp, gtile, H, i, f, g, o, mask)
    c_prev = tl.load(cells_ptr + prev * plane + tile, mask=mask, other=0.0)
    if DEPTH == 1:
        _ascend(
            f * c_prev + i * g,
            o,
            gates_ptr,
            cells_ptr,
            act_cells_ptr,
            h_ptr,
            y_ptr,
            zo_ptr,
            zo_sk,
            zo_st,
            zo_sb,
            ln_ptr,
            nc_ptr,
            rs_ptr,
            t,
            prev,
            new,
            T,
            B,
            H,
            rows,
            units,
            rmask,
            umask,
            tile,
            gtile,
            mask,
            act,
            0,
            CELL_ACTS,
            HAS_BS,
            ZONEOUT,
            NORMS,
        )
    else:
        _store_level_input(inputs_ptr + t * (2 * plane), rows, units, H, i, f, g, c_prev, mask, act)


@triton.jit(do_not_specialize=["s", "T"])
def fwd_nested_kernel(
    gates_ptr,
    inputs_ptr,
    w_ptr,
    bias_ptr,
    cells_ptr,
    act_cells_ptr,
    h_ptr,
    y_ptr,
    bs_ptr,
    g_ptr,
    s,
    T,
    B,
    H,
    zo_ptr,
    zo_sk,
    zo_st,
    zo_sb,
    ln_ptr,
    nz_ptr,
    nc_ptr,
    rs_ptr,
    LEVEL: tl.constexpr,
    DEPTH: tl.constexpr,
    GATE_ACT: tl.constexpr,
    CAND_ACT: tl.constexpr,
    CELL_ACTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CUBLAS: tl.constexpr,
    ZONEOUT: tl.constexpr,
    NORMS: tl.constexpr,
):
    """Nested level LEVEL (1..D-1) of step ``s``: gates = b + [x~ | h~] [W_ih | W_hh]^T (CUBLAS:
    the product read from ``g_ptr``).

    Not the last level: writes level LEVEL+1's input. Last level: the cell update, then the
    whole ascent and h for this program's units.
    """
    rows, units, rmask, umask, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    t, prev, new = _slots(s, T, REVERSE)
    plane = B * H
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    act = _active(bs_ptr, t, rows, B, HAS_BS)

    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_i, acc_f, acc_g, acc_o = zero, zero, zero, zero
    if HAS_BIAS:
        acc_i += tl.load(bias_ptr + units, mask=umask, other=0.0)[None, :]
        acc_f += tl.load(bias_ptr + H + units, mask=umask, other=0.0)[None, :]
        acc_g += tl.load(bias_ptr + 2 * H + units, mask=umask, other=0.0)[None, :]
        acc_o += tl.load(bias_ptr + 3 * H + units, mask=umask, other=0.0)[None, :]
    if CUBLAS:
        acc_i, acc_f, acc_g, acc_o = _add_gemm_gates(
            acc_i, acc_f, acc_g, acc_o, g_ptr, gtile, H, mask
        )
    else:
        acc_i, acc_f, acc_g, acc_o = _matmul_gates(
            acc_i,
            acc_f,
            acc_g,
            acc_o,
            a_ptr=inputs_ptr + ((LEVEL - 1) * T + t) * (2 * plane),
            a_stride=2 * H,
            w_ptr=w_ptr,
            rows=rows,
            units=units,
            rmask=rmask,
            umask=umask,
            H=H,
            K=2 * H,
            BLOCK_K=BLOCK_K,
            DOT_PREC=DOT_PREC,
        )
    if (NORMS >> LEVEL) & 1:
        acc_i, acc_f, acc_g, acc_o = _norm_gates(
            acc_i,
            acc_f,
            acc_g,
            acc_o,
            ln_ptr + LEVEL * (10 * H),
            nz_ptr + (LEVEL * T + t) * (4 * plane),
            rs_ptr + (LEVEL * T + t) * (5 * B),
            rows,
            units,
            rmask,
            umask,
            mask,
            gtile,
            H,
        )
    i = _act(acc_i, GATE_ACT)
    f = _act(acc_f, GATE_ACT)
    g = _act(acc_g, CAND_ACT)
    o = _act(acc_o, GATE_ACT)
    _store_gates(gates_ptr + (LEVEL * T + t) * (4 * plane), gtile, H, i, f, g, o, mask)
    c_prev = tl.load(cells_ptr + (LEVEL * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    if LEVEL < DEPTH - 1:
        in_ptr = inputs_ptr + (LEVEL * T + t) * (2 * plane)
        _store_level_input(in_ptr, rows, units, H, i, f, g, c_prev, mask, act)
    else:
        _ascend(
            f * c_prev + i * g,
            o,
            gates_ptr,
            cells_ptr,
            act_cells_ptr,
            h_ptr,
            y_ptr,
            zo_ptr,
            zo_sk,
            zo_st,
            zo_sb,
            ln_ptr,
            nc_ptr,
            rs_ptr,
            t,
            prev,
            new,
            T,
            B,
            H,
            rows,
            units,
            rmask,
            umask,
            tile,
            gtile,
            mask,
            act,
            LEVEL,
            CELL_ACTS,
            HAS_BS,
            ZONEOUT,
            NORMS,
        )


# ---------------------------------------------------------------------------------------------------
# backward (gate and state gradients only; parameter gradients are GEMMs after the loop)


@triton.jit
def _gate_grads(
    dp,
    op,
    gp,
    gtile,
    H,
    d_ig,
    d_fc,
    c_prev,
    mask,
    act,
    ln_ptr,
    nz_ptr,
    rs_ptr,
    dnz_ptr,
    rows,
    units,
    rmask,
    umask,
    GATE_ACT: tl.constexpr,
    CAND_ACT: tl.constexpr,
    OP_COPY: tl.constexpr,
    NORM: tl.constexpr,
):
    """Gradients of one level's i, f, g pre-activations from d(i*g) and d(f*c_prev) (into ``dp``
    and, with OP_COPY, ``op``); returns f. NORM: the level's gates are layer-normalised
    (``ln_ptr``: its parameters; ``nz_ptr``, ``rs_ptr``, ``dnz_ptr``: its planes at this step)."""
    i = tl.load(gp + gtile, mask=mask, other=0.0)
    f = tl.load(gp + gtile + H, mask=mask, other=0.0)
    g = tl.load(gp + gtile + 2 * H, mask=mask, other=0.0)
    d_i = tl.where(act, d_ig * g * _act_grad(i, GATE_ACT), 0.0)
    d_f = tl.where(act, d_fc * c_prev * _act_grad(f, GATE_ACT), 0.0)
    d_g = tl.where(act, d_ig * i * _act_grad(g, CAND_ACT), 0.0)
    if NORM:  # these are the gradients of LN's outputs; dA gets those of its inputs
        d_i = _norm_grad(
            d_i, gtile, 0, nz_ptr, rs_ptr, dnz_ptr, ln_ptr, rows, units, rmask, umask, mask, H
        )
        d_f = _norm_grad(
            d_f,
            gtile + H,
            1,
            nz_ptr,
            rs_ptr,
            dnz_ptr,
            ln_ptr + H,
            rows,
            units,
            rmask,
            umask,
            mask,
            H,
        )
        d_g = _norm_grad(
            d_g,
            gtile + 2 * H,
            2,
            nz_ptr,
            rs_ptr,
            dnz_ptr,
            ln_ptr + 2 * H,
            rows,
            units,
            rmask,
            umask,
            mask,
            H,
        )
    _store_grad(dp, op, gtile, d_i, mask, OP_COPY)
    _store_grad(dp, op, gtile + H, d_f, mask, OP_COPY)
    _store_grad(dp, op, gtile + 2 * H, d_g, mask, OP_COPY)
    return f


@triton.jit(do_not_specialize=["s", "T"])
def bwd_inner_kernel(
    dA_ptr,
    w_hh_ptr,
    dh_ptr,
    dc_ptr,
    dy_ptr,
    gates_ptr,
    cells_ptr,
    act_cells_ptr,
    bs_ptr,
    g_ptr,
    op_ptr,
    s,
    T,
    B,
    H,
    zo_ptr,
    zo_sk,
    zo_st,
    zo_sb,
    ln_ptr,
    nz_ptr,
    nc_ptr,
    rs_ptr,
    dnz_ptr,
    dnc_ptr,
    DEPTH: tl.constexpr,
    GATE_ACTS: tl.constexpr,
    CAND_ACTS: tl.constexpr,
    CELL_ACTS: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CUBLAS: tl.constexpr,
    OP_COPY: tl.constexpr,
    ZONEOUT: tl.constexpr,
    NORMS: tl.constexpr,
):
    """First backward launch of step ``s``.

    GEMM: dh = dA^0(step s+1) @ W_hh^0 (the outer gates of the step processed after s; CUBLAS:
    read from ``g_ptr``, (B, H)), kept in ``dh`` for rows that were inactive at s+1. Epilogue: add
    the output gradient, go back down through h = o_0 act_0(c^0) and c^{k-1} = o_k act_k(c^k) (the
    o-gate gradients of every level), then the innermost level's i/f/g gate gradients and its cell
    carry dc^{D-1} = d c * f. OP_COPY: the gate gradients also go to ``op_ptr`` (D, B, 4H).

    ZONEOUT: a state carried to step t is keep * (its value at t-1) + (1 - keep) * (the new one).
    ``dh`` then holds, between launches, keep^D_{t+1} * (the gradient of h_{t+1}) for rows active
    at t+1, which the GEMM's result joins; the new h and cells get the (1 - keep) shares, and
    keep^{D-1} * dc^{D-1} joins the cell carry.
    """
    rows, units, rmask, umask, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    t, prev, _new = _slots(s, T, REVERSE)
    plane = B * H
    H4 = 4 * H
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * H4 + units[None, :]

    dh = tl.load(dh_ptr + tile, mask=mask, other=0.0)
    if s + 1 < T:
        t_next = t - 1 if REVERSE else t + 1
        if CUBLAS:
            acc = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            wdt = w_hh_ptr.dtype.element_ty
            for n0 in range(0, H4, BLOCK_K):
                ns = n0 + tl.arange(0, BLOCK_K)
                nmask = ns < H4
                da = tl.load(
                    dA_ptr + t_next * (4 * plane) + rows[:, None] * H4 + ns[None, :],
                    mask=rmask[:, None] & nmask[None, :],
                    other=0.0,
                ).to(wdt)
                w = tl.load(
                    w_hh_ptr + ns[:, None] * H + units[None, :],
                    mask=nmask[:, None] & umask[None, :],
                    other=0.0,
                )
                acc = tl.dot(da, w, acc, input_precision=DOT_PREC)
        if ZONEOUT:  # h_t also passed straight to h_{t+1}
            acc += dh
        dh = tl.where(_active(bs_ptr, t_next, rows, B, HAS_BS), acc, dh)
        tl.store(dh_ptr + tile, dh, mask=mask)

    act = _active(bs_ptr, t, rows, B, HAS_BS)
    grad = dh + tl.load(dy_ptr + t * plane + tile, mask=mask, other=0.0).to(tl.float32)
    if ZONEOUT:  # the kept share goes to h_{t-1} directly; the new h gets the rest
        keep = _keep(zo_ptr, DEPTH, t, rows, units, zo_sk, zo_st, zo_sb, mask)
        tl.store(dh_ptr + tile, tl.where(act, keep * grad, dh), mask=mask)
        grad = grad * (1.0 - keep)
    dc_old = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(DEPTH):  # grad: of the output of level k (h, then c^{k-1})
        o = tl.load(gates_ptr + (k * T + t) * (4 * plane) + gtile + 3 * H, mask=mask, other=0.0)
        a = tl.load(act_cells_ptr + (k * T + t) * plane + tile, mask=mask, other=0.0)
        d_o = grad * a * _act_grad(o, (GATE_ACTS >> (4 * k)) & 15)
        if (NORMS >> k) & 1:  # through the o block's LN
            d_o = _norm_grad(
                tl.where(act, d_o, 0.0),
                gtile + 3 * H,
                3,
                nz_ptr + (k * T + t) * (4 * plane),
                rs_ptr + (k * T + t) * (5 * B),
                dnz_ptr + (k * T + t) * (4 * plane),
                ln_ptr + k * (10 * H) + 3 * H,
                rows,
                units,
                rmask,
                umask,
                mask,
                H,
            )
        _store_grad(
            dA_ptr + (k * T + t) * (4 * plane),
            op_ptr + k * (4 * plane),
            gtile + 3 * H,
            tl.where(act, d_o, 0.0),
            mask,
            OP_COPY,
        )
        dc_old = tl.load(dc_ptr + k * plane + tile, mask=mask, other=0.0)
        d_new = grad * o * _act_grad(a, (CELL_ACTS >> (4 * k)) & 15)
        if (NORMS >> k) & 1:  # through the cell's LN
            d_new = _norm_grad(
                tl.where(act, d_new, 0.0),
                tile,
                4,
                nc_ptr + (k * T + t) * plane,
                rs_ptr + (k * T + t) * (5 * B),
                dnc_ptr + (k * T + t) * plane,
                ln_ptr + k * (10 * H) + 8 * H,
                rows,
                units,
                rmask,
                umask,
                mask,
                H,
            )
        if ZONEOUT:  # the new cell gets the carried cell's gradient less the kept share
            keep = _keep(zo_ptr, k, t, rows, units, zo_sk, zo_st, zo_sb, mask)
            grad = (1.0 - keep) * dc_old + d_new
        else:
            grad = dc_old + d_new

    # the innermost level L adds: c^L = f_L c^L_{t-1} + i_L g_L, so d(i g) = d(f c_prev) = grad
    L = DEPTH - 1
    c_prev = tl.load(cells_ptr + (L * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    f = _gate_grads(
        dA_ptr + (L * T + t) * (4 * plane),
        op_ptr + L * (4 * plane),
        gates_ptr + (L * T + t) * (4 * plane),
        gtile,
        H,
        grad,
        grad,
        c_prev,
        mask,
        act,
        ln_ptr + L * (10 * H),
        nz_ptr + (L * T + t) * (4 * plane),
        rs_ptr + (L * T + t) * (5 * B),
        dnz_ptr + (L * T + t) * (4 * plane),
        rows,
        units,
        rmask,
        umask,
        (GATE_ACTS >> (4 * L)) & 15,
        (CAND_ACTS >> (4 * L)) & 15,
        OP_COPY,
        (NORMS >> L) & 1,
    )
    dc_prev = grad * f
    if ZONEOUT:
        dc_prev += _keep(zo_ptr, L, t, rows, units, zo_sk, zo_st, zo_sb, mask) * dc_old
    tl.store(dc_ptr + L * plane + tile, tl.where(act, dc_prev, dc_old), mask=mask)


@triton.jit(do_not_specialize=["s", "T"])
def bwd_level_kernel(
    dA_ptr,
    w_ptr,
    dc_ptr,
    gates_ptr,
    cells_ptr,
    bs_ptr,
    g_ptr,
    op_ptr,
    s,
    T,
    B,
    H,
    zo_ptr,
    zo_sk,
    zo_st,
    zo_sb,
    ln_ptr,
    nz_ptr,
    nc_ptr,
    rs_ptr,
    dnz_ptr,
    dnc_ptr,
    LEVEL: tl.constexpr,
    GATE_ACT: tl.constexpr,
    CAND_ACT: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CUBLAS: tl.constexpr,
    OP_COPY: tl.constexpr,
    ZONEOUT: tl.constexpr,
    NORMS: tl.constexpr,
):
    """Level LEVEL (D-2 .. 0) of backward step ``s`` (launched only when D >= 2).

    GEMM: [dx~ | dh~] = dA^{LEVEL+1} @ [W_ih | W_hh] of the level below (``w_ptr``, (4H, 2H);
    CUBLAS: read from ``g_ptr``, (B, 2H)). Epilogue: level LEVEL's i/f/g gate gradients (its o
    gradient was written by ``bwd_inner_kernel``; OP_COPY: also into ``op_ptr``) and its cell
    carry dc^LEVEL = dh~ * f (ZONEOUT: plus keep^LEVEL * dc^LEVEL, the kept share).
    """
    rows, units, rmask, umask, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    t, prev, _new = _slots(s, T, REVERSE)
    plane = B * H
    H4 = 4 * H
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * H4 + units[None, :]

    if CUBLAS:
        xtile = rows[:, None] * (2 * H) + units[None, :]
        d_x = tl.load(g_ptr + xtile, mask=mask, other=0.0).to(tl.float32)
        d_h = tl.load(g_ptr + xtile + H, mask=mask, other=0.0).to(tl.float32)
    else:
        d_x = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        d_h = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        wdt = w_ptr.dtype.element_ty
        da_base = dA_ptr + ((LEVEL + 1) * T + t) * (4 * plane)
        for n0 in range(0, H4, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            nmask = ns < H4
            da = tl.load(
                da_base + rows[:, None] * H4 + ns[None, :],
                mask=rmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(wdt)
            w_off = ns[:, None] * (2 * H) + units[None, :]
            wmask = nmask[:, None] & umask[None, :]
            d_x = tl.dot(
                da, tl.load(w_ptr + w_off, mask=wmask, other=0.0), d_x, input_precision=DOT_PREC
            )
            d_h = tl.dot(
                da,
                tl.load(w_ptr + w_off + H, mask=wmask, other=0.0),
                d_h,
                input_precision=DOT_PREC,
            )

    act = _active(bs_ptr, t, rows, B, HAS_BS)
    c_prev = tl.load(cells_ptr + (LEVEL * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    f = _gate_grads(
        dA_ptr + (LEVEL * T + t) * (4 * plane),
        op_ptr + LEVEL * (4 * plane),
        gates_ptr + (LEVEL * T + t) * (4 * plane),
        gtile,
        H,
        d_x,
        d_h,
        c_prev,
        mask,
        act,
        ln_ptr + LEVEL * (10 * H),
        nz_ptr + (LEVEL * T + t) * (4 * plane),
        rs_ptr + (LEVEL * T + t) * (5 * B),
        dnz_ptr + (LEVEL * T + t) * (4 * plane),
        rows,
        units,
        rmask,
        umask,
        GATE_ACT,
        CAND_ACT,
        OP_COPY,
        (NORMS >> LEVEL) & 1,
    )
    dc_old = tl.load(dc_ptr + LEVEL * plane + tile, mask=mask, other=0.0)
    dc_prev = d_h * f
    if ZONEOUT:
        dc_prev += _keep(zo_ptr, LEVEL, t, rows, units, zo_sk, zo_st, zo_sb, mask) * dc_old
    tl.store(dc_ptr + LEVEL * plane + tile, tl.where(act, dc_prev, dc_old), mask=mask)
