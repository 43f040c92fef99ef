"""Triton kernels of the fused nested-LSTM op (one time step, one level per launch).

Imported only by ``fused_triton.py``, which the dispatcher imports lazily: importing ``nestrnn`` never
imports Triton. Every kernel runs on a 2-D grid ``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))``: a program
owns BLOCK_B batch rows and BLOCK_H whole hidden units, i.e. all four gates (i, f, g, o) of those
units, so the pointwise gate math runs in the GEMM's epilogue without a round trip through memory.

Buffers (all contiguous, built by ``fused_triton.py``; T steps, B rows, H units, D levels):

    xproj  (T, B, 4H)      fp32   outer input projection W_ih x_t + b_ih + b_hh (one GEMM, all steps)
    hbuf   (T+1, B, H)     dtype  outer hidden state; slot ``t`` / ``t+1`` around step t (forward),
                                  ``t+1`` / ``t`` (reverse), so the initial state is slot 0 / T
    cbuf   (D, T+1, B, H)  fp32   cells of every level, same slots as hbuf
    gates  (D, T, B, 4H)   fp32   activated gates i, f, g, o of every level (g is the identity
                                  candidate at level 0 when D >= 2)
    xt, ht (D-1, T, B, H)  dtype  inputs of level k+1: x~ = i_k * g_k and h~ = f_k * c^k_{t-1}
    dA     (D, T, B, 4H)   fp32   gradients of the pre-activation gates (backward)
    dh     (B, H)          fp32   gradient carried into the outer hidden state (backward)
    dc     (D, B, H)       fp32   gradients carried into the cells (backward)

Matmul operands are in the input dtype (``dtype``) with fp32 accumulation; state and gate math are
fp32. ``s`` is the processing-order step and ``T`` the sequence length; neither is specialised on.
Only plain pointer arithmetic is used (no block pointers, no autotuning) so the kernels run on
Triton 3.6 to 3.9 and under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------
# small helpers


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1: one exp, saturates cleanly at both ends
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


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
def _n_active(bs_ptr, t, B, HAS_BS: tl.constexpr):
    """Rows ``b < n`` are active at time ``t`` (packed batches), all rows otherwise."""
    n = tl.load(bs_ptr + t) if HAS_BS else B
    return n


@triton.jit
def _acc_gates(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
    a_ptr,
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
    """acc_gate += A[rows, :] @ W[gate * H + units, :]^T for the four gates.

    ``A`` is (B, K) row-major at ``a_ptr``, ``W`` is (4H, K) row-major (nn.LSTM's layout).
    """
    wdt = w_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * K + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(wdt)
        w_off = units[None, :] * K + ks[:, None]
        wmask = kmask[:, None] & umask[None, :]
        w_i = tl.load(w_ptr + w_off, mask=wmask, other=0.0)
        w_f = tl.load(w_ptr + H * K + w_off, mask=wmask, other=0.0)
        w_g = tl.load(w_ptr + 2 * H * K + w_off, mask=wmask, other=0.0)
        w_o = tl.load(w_ptr + 3 * H * K + w_off, mask=wmask, other=0.0)
        acc_i = tl.dot(a, w_i, acc_i, input_precision=DOT_PREC)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=DOT_PREC)
        acc_g = tl.dot(a, w_g, acc_g, input_precision=DOT_PREC)
        acc_o = tl.dot(a, w_o, acc_o, input_precision=DOT_PREC)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _keep_inactive(ptr_new, ptr_prev, val, tile, mask, act, HAS_BS: tl.constexpr):
    """Store a state value; with packed batches inactive rows keep the previous value."""
    if HAS_BS:
        old = tl.load(ptr_prev + tile, mask=mask, other=0.0).to(tl.float32)
        val = tl.where(act, val, old)
    tl.store(ptr_new + tile, val.to(ptr_new.dtype.element_ty), mask=mask)


@triton.jit
def _ascend_and_store(
    c_cur,
    o_cur,
    gates_ptr,
    c_ptr,
    h_ptr,
    y_ptr,
    t,
    prev,
    new,
    T,
    B,
    H,
    tile,
    gtile,
    mask,
    act,
    LEVEL: tl.constexpr,
    HAS_BS: tl.constexpr,
):
    """Innermost epilogue: store c^LEVEL, run the ascent c^{k-1} = o_k tanh(c^k), h = o_0 tanh(c^0).

    ``c_cur`` is the new innermost cell, ``o_cur`` that level's output gate (in registers); the
    output gates of the upper levels are read back from ``gates`` (written by earlier launches).
    """
    plane = B * H
    _keep_inactive(
        c_ptr + (LEVEL * (T + 1) + new) * plane,
        c_ptr + (LEVEL * (T + 1) + prev) * plane,
        c_cur,
        tile,
        mask,
        act,
        HAS_BS,
    )
    for j in tl.static_range(LEVEL):
        k = LEVEL - 1 - j  # the level whose cell is produced now
        c_cur = o_cur * _tanh(c_cur)
        _keep_inactive(
            c_ptr + (k * (T + 1) + new) * plane,
            c_ptr + (k * (T + 1) + prev) * plane,
            c_cur,
            tile,
            mask,
            act,
            HAS_BS,
        )
        o_cur = tl.load(gates_ptr + (k * T + t) * (4 * plane) + gtile + 3 * H, mask=mask, other=0.0)
    h = o_cur * _tanh(c_cur)
    _keep_inactive(h_ptr + new * plane, h_ptr + prev * plane, h, tile, mask, act, HAS_BS)
    y = tl.where(act, h, 0.0)
    tl.store(y_ptr + t * plane + tile, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["s", "T"])
def fwd_outer_kernel(
    xproj_ptr,
    h_ptr,
    w_hh_ptr,
    gates_ptr,
    xt_ptr,
    ht_ptr,
    c_ptr,
    y_ptr,
    bs_ptr,
    s,
    T,
    B,
    H,
    DEPTH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Level 0 of step ``s``: gates = xproj[t] + h_{t-1} W_hh^T.

    DEPTH == 1: also the cell update and h (a plain LSTM step). DEPTH >= 2: writes level 1's inputs
    x~ = i*g (identity candidate) and h~ = f*c^0_{t-1}.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    umask = units < H
    mask = rmask[:, None] & umask[None, :]
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    t, prev, new = _slots(s, T, REVERSE)
    plane = B * H

    xp = xproj_ptr + t * (4 * plane)
    acc_i = tl.load(xp + gtile, mask=mask, other=0.0)
    acc_f = tl.load(xp + gtile + H, mask=mask, other=0.0)
    acc_g = tl.load(xp + gtile + 2 * H, mask=mask, other=0.0)
    acc_o = tl.load(xp + gtile + 3 * H, mask=mask, other=0.0)
    acc_i, acc_f, acc_g, acc_o = _acc_gates(
        acc_i,
        acc_f,
        acc_g,
        acc_o,
        h_ptr + prev * plane,
        w_hh_ptr,
        rows,
        units,
        rmask,
        umask,
        H,
        H,
        BLOCK_K,
        DOT_PREC,
    )
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    o = _sigmoid(acc_o)
    g = _tanh(acc_g) if DEPTH == 1 else acc_g  # identity candidate when nested
    gp = gates_ptr + t * (4 * plane) + gtile
    tl.store(gp, i, mask=mask)
    tl.store(gp + H, f, mask=mask)
    tl.store(gp + 2 * H, g, mask=mask)
    tl.store(gp + 3 * H, o, mask=mask)

    c_prev = tl.load(c_ptr + prev * plane + tile, mask=mask, other=0.0)
    if DEPTH == 1:
        n_act = _n_active(bs_ptr, t, B, HAS_BS)
        act = (rows < n_act)[:, None]
        c_new = f * c_prev + i * g
        _ascend_and_store(
            c_new,
            o,
            gates_ptr,
            c_ptr,
            h_ptr,
            y_ptr,
            t,
            prev,
            new,
            T,
            B,
            H,
            tile,
            gtile,
            mask,
            act,
            0,
            HAS_BS,
        )
    else:
        dt = xt_ptr.dtype.element_ty
        tl.store(xt_ptr + t * plane + tile, (i * g).to(dt), mask=mask)
        tl.store(ht_ptr + t * plane + tile, (f * c_prev).to(dt), mask=mask)


@triton.jit(do_not_specialize=["s", "T"])
def fwd_nested_kernel(
    xt_ptr,
    ht_ptr,
    w_ih_ptr,
    w_hh_ptr,
    bias_ptr,
    gates_ptr,
    c_ptr,
    h_ptr,
    y_ptr,
    bs_ptr,
    s,
    T,
    B,
    H,
    LEVEL: tl.constexpr,
    DEPTH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Nested level LEVEL (1..D-1) of step ``s``: gates = x~ W_ih^T + h~ W_hh^T + b.

    Not the last level: writes level LEVEL+1's inputs. Last level: cell update, then the whole
    ascent and h for this program's units.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    umask = units < H
    mask = rmask[:, None] & umask[None, :]
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    t, prev, new = _slots(s, T, REVERSE)
    plane = B * H

    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_BIAS:
        acc_i = zero + tl.load(bias_ptr + units, mask=umask, other=0.0)[None, :]
        acc_f = zero + tl.load(bias_ptr + H + units, mask=umask, other=0.0)[None, :]
        acc_g = zero + tl.load(bias_ptr + 2 * H + units, mask=umask, other=0.0)[None, :]
        acc_o = zero + tl.load(bias_ptr + 3 * H + units, mask=umask, other=0.0)[None, :]
    else:
        acc_i = zero
        acc_f = zero
        acc_g = zero
        acc_o = zero
    in_off = ((LEVEL - 1) * T + t) * plane
    acc_i, acc_f, acc_g, acc_o = _acc_gates(
        acc_i,
        acc_f,
        acc_g,
        acc_o,
        xt_ptr + in_off,
        w_ih_ptr,
        rows,
        units,
        rmask,
        umask,
        H,
        H,
        BLOCK_K,
        DOT_PREC,
    )
    acc_i, acc_f, acc_g, acc_o = _acc_gates(
        acc_i,
        acc_f,
        acc_g,
        acc_o,
        ht_ptr + in_off,
        w_hh_ptr,
        rows,
        units,
        rmask,
        umask,
        H,
        H,
        BLOCK_K,
        DOT_PREC,
    )
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    gp = gates_ptr + (LEVEL * T + t) * (4 * plane) + gtile
    tl.store(gp, i, mask=mask)
    tl.store(gp + H, f, mask=mask)
    tl.store(gp + 2 * H, g, mask=mask)
    tl.store(gp + 3 * H, o, mask=mask)

    c_prev = tl.load(c_ptr + (LEVEL * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    if LEVEL < DEPTH - 1:
        dt = xt_ptr.dtype.element_ty
        out_off = (LEVEL * T + t) * plane
        tl.store(xt_ptr + out_off + tile, (i * g).to(dt), mask=mask)
        tl.store(ht_ptr + out_off + tile, (f * c_prev).to(dt), mask=mask)
    else:
        n_act = _n_active(bs_ptr, t, B, HAS_BS)
        act = (rows < n_act)[:, None]
        c_new = f * c_prev + i * g
        _ascend_and_store(
            c_new,
            o,
            gates_ptr,
            c_ptr,
            h_ptr,
            y_ptr,
            t,
            prev,
            new,
            T,
            B,
            H,
            tile,
            gtile,
            mask,
            act,
            LEVEL,
            HAS_BS,
        )


# ---------------------------------------------------------------------------------------------------
# backward (state and gate gradients only; weight gradients are GEMMs after the loop)


@triton.jit(do_not_specialize=["s", "T"])
def bwd_inner_kernel(
    dA_ptr,
    w_hh_ptr,
    dh_ptr,
    dc_ptr,
    dy_ptr,
    gates_ptr,
    c_ptr,
    bs_ptr,
    s,
    T,
    B,
    H,
    DEPTH: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """First backward launch of step ``s``.

    GEMM: dh = dA^0(step s+1) @ W_hh^0 (the outer gates of the step processed after s), kept in
    ``dh`` for rows that were inactive at s+1. Epilogue: add the output gradient, descend through
    h = o_0 tanh(c^0) and c^{k-1} = o_k tanh(c^k) (o-gate gradients of every level), then the
    innermost level's i/f/g gate gradients and its cell carry dc^{D-1} = dc^{D-1}_t * f_{D-1}.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    umask = units < H
    mask = rmask[:, None] & umask[None, :]
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    t, prev, new = _slots(s, T, REVERSE)
    plane = B * H
    H4 = 4 * H

    dh = tl.load(dh_ptr + tile, mask=mask, other=0.0)
    if s + 1 < T:
        t_next = t - 1 if REVERSE else t + 1
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        wdt = w_hh_ptr.dtype.element_ty
        da_base = dA_ptr + t_next * (4 * plane)
        for n0 in range(0, H4, BLOCK_K):
            ns = n0 + tl.arange(0, BLOCK_K)
            nmask = ns < H4
            da = tl.load(
                da_base + rows[:, None] * H4 + ns[None, :],
                mask=rmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(wdt)
            w = tl.load(
                w_hh_ptr + ns[:, None] * H + units[None, :],
                mask=nmask[:, None] & umask[None, :],
                other=0.0,
            )
            acc = tl.dot(da, w, acc, input_precision=DOT_PREC)
        if HAS_BS:
            n_next = tl.load(bs_ptr + t_next)
            dh = tl.where((rows < n_next)[:, None], acc, dh)
        else:
            dh = acc
        tl.store(dh_ptr + tile, dh, mask=mask)

    n_act = _n_active(bs_ptr, t, B, HAS_BS)
    act = (rows < n_act)[:, None]
    dh = dh + tl.load(dy_ptr + t * plane + tile, mask=mask, other=0.0).to(tl.float32)

    # descent: h = o_0 tanh(c^0), then c^{k-1} = o_k tanh(c^k)
    o = tl.load(gates_ptr + t * (4 * plane) + gtile + 3 * H, mask=mask, other=0.0)
    tc = _tanh(tl.load(c_ptr + new * plane + tile, mask=mask, other=0.0))
    dc_old = tl.load(dc_ptr + tile, mask=mask, other=0.0)
    d_c = dc_old + dh * o * (1.0 - tc * tc)
    tl.store(
        dA_ptr + t * (4 * plane) + gtile + 3 * H,
        tl.where(act, dh * tc * o * (1.0 - o), 0.0),
        mask=mask,
    )
    for j in tl.static_range(DEPTH - 1):
        k = j + 1
        o = tl.load(gates_ptr + (k * T + t) * (4 * plane) + gtile + 3 * H, mask=mask, other=0.0)
        tc = _tanh(tl.load(c_ptr + (k * (T + 1) + new) * plane + tile, mask=mask, other=0.0))
        dc_old = tl.load(dc_ptr + k * plane + tile, mask=mask, other=0.0)
        d_o = d_c * tc
        d_c = dc_old + d_c * o * (1.0 - tc * tc)
        tl.store(
            dA_ptr + (k * T + t) * (4 * plane) + gtile + 3 * H,
            tl.where(act, d_o * o * (1.0 - o), 0.0),
            mask=mask,
        )

    # innermost level L: c^L = f_L c^L_{t-1} + i_L g_L (g_L = tanh: L >= 1, or D == 1)
    L = DEPTH - 1
    gp = gates_ptr + (L * T + t) * (4 * plane) + gtile
    i = tl.load(gp, mask=mask, other=0.0)
    f = tl.load(gp + H, mask=mask, other=0.0)
    g = tl.load(gp + 2 * H, mask=mask, other=0.0)
    c_prev = tl.load(c_ptr + (L * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    dp = dA_ptr + (L * T + t) * (4 * plane) + gtile
    tl.store(dp, tl.where(act, d_c * g * i * (1.0 - i), 0.0), mask=mask)
    tl.store(dp + H, tl.where(act, d_c * c_prev * f * (1.0 - f), 0.0), mask=mask)
    tl.store(dp + 2 * H, tl.where(act, d_c * i * (1.0 - g * g), 0.0), mask=mask)
    tl.store(dc_ptr + L * plane + tile, tl.where(act, d_c * f, dc_old), mask=mask)


@triton.jit(do_not_specialize=["s", "T"])
def bwd_level_kernel(
    dA_ptr,
    w_ih_ptr,
    w_hh_ptr,
    dc_ptr,
    gates_ptr,
    c_ptr,
    bs_ptr,
    s,
    T,
    B,
    H,
    LEVEL: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_BS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Level LEVEL (D-2 .. 0) of backward step ``s`` (only launched when D >= 2).

    GEMM: dx~ = dA^{LEVEL+1} @ W^{LEVEL+1}_ih and dh~ = dA^{LEVEL+1} @ W^{LEVEL+1}_hh (weights of the
    level below). Epilogue: i/f/g gate gradients of level LEVEL (its o gradient was written by
    ``bwd_inner_kernel``) and the cell carry dc^LEVEL = dh~ * f_LEVEL.
    """
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < B
    umask = units < H
    mask = rmask[:, None] & umask[None, :]
    tile = rows[:, None] * H + units[None, :]
    gtile = rows[:, None] * (4 * H) + units[None, :]
    t, prev, _new = _slots(s, T, REVERSE)
    plane = B * H
    H4 = 4 * H

    d_xt = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    d_ht = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    wdt = w_ih_ptr.dtype.element_ty
    da_base = dA_ptr + ((LEVEL + 1) * T + t) * (4 * plane)
    for n0 in range(0, H4, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nmask = ns < H4
        da = tl.load(
            da_base + rows[:, None] * H4 + ns[None, :],
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        ).to(wdt)
        w_off = ns[:, None] * H + units[None, :]
        wmask = nmask[:, None] & umask[None, :]
        w_i = tl.load(w_ih_ptr + w_off, mask=wmask, other=0.0)
        w_h = tl.load(w_hh_ptr + w_off, mask=wmask, other=0.0)
        d_xt = tl.dot(da, w_i, d_xt, input_precision=DOT_PREC)
        d_ht = tl.dot(da, w_h, d_ht, input_precision=DOT_PREC)

    n_act = _n_active(bs_ptr, t, B, HAS_BS)
    act = (rows < n_act)[:, None]
    gp = gates_ptr + (LEVEL * T + t) * (4 * plane) + gtile
    i = tl.load(gp, mask=mask, other=0.0)
    f = tl.load(gp + H, mask=mask, other=0.0)
    g = tl.load(gp + 2 * H, mask=mask, other=0.0)
    c_prev = tl.load(c_ptr + (LEVEL * (T + 1) + prev) * plane + tile, mask=mask, other=0.0)
    # the outer level's candidate is the identity when nested (this kernel runs only for D >= 2)
    d_g = d_xt * i if LEVEL == 0 else d_xt * i * (1.0 - g * g)
    dp = dA_ptr + (LEVEL * T + t) * (4 * plane) + gtile
    tl.store(dp, tl.where(act, d_xt * g * i * (1.0 - i), 0.0), mask=mask)
    tl.store(dp + H, tl.where(act, d_ht * c_prev * f * (1.0 - f), 0.0), mask=mask)
    tl.store(dp + 2 * H, tl.where(act, d_g, 0.0), mask=mask)
    dc_old = tl.load(dc_ptr + LEVEL * plane + tile, mask=mask, other=0.0)
    tl.store(dc_ptr + LEVEL * plane + tile, tl.where(act, d_ht * f, dc_old), mask=mask)
