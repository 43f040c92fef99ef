"""The op's portable implementation: its time loops in plain PyTorch calls, on any device.

It runs where neither the C loop nor the Triton kernels can (no C compiler, CUDA without Triton,
or a device the kernels do not serve). Same phases as the C loop: one GEMM for the outer input
projection of every step, then per step one GEMM per level and the pointwise math; the backward
loop computes gate and state gradients only (``gradients.py`` does the rest). Inputs arrive in
the state dtype (the op casts half precision to float32 first). It computes what the reference
cell (``ops/common/reference.py``) computes, with its activations applied in place
(``ACTIVATIONS_INPLACE``) into saved buffers, and a backward written by hand.

Layer normalisation (``norms``: per level ``LevelNorms`` or None) normalises a level's gate blocks
where they lie, before their activation, and each new cell into ``act_cells`` before its
activation, saving what its backward reads (``layout.Saved``); the backward then also returns
the gradients of every level's ``LevelNorms``, summed over the steps as it goes.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from nestrnn.activations import output_derivative
from nestrnn.ops.common.levels import (
    LAYER_NORM_EPS,
    LevelActivations,
    LevelNorms,
    LevelWeights,
    time_order,
)
from nestrnn.ops.common.reference import ACTIVATIONS_INPLACE, zoneout_mix
from nestrnn.ops.nested_lstm.layout import Saved, empty_saved, state_slots


def _activate_gates_(z: Tensor, act: LevelActivations) -> None:
    """Activate one level's (rows, 4H) pre-activations i, f, g, o in place."""
    i_f, g, o = z.tensor_split((2 * z.shape[1] // 4, 3 * z.shape[1] // 4), dim=1)
    ACTIVATIONS_INPLACE[act.gate](i_f)
    ACTIVATIONS_INPLACE[act.candidate](g)
    ACTIVATIONS_INPLACE[act.gate](o)


def _normalise_(
    rows: Tensor, normed: Tensor, inv_std: Tensor, weight: Tensor, bias: Tensor, blocks: int
) -> None:
    """Layer normalisation of each of the ``blocks`` equal parts of ``rows`` (R, blocks * H) in
    place; the normalised values before scale and shift go to ``normed`` (like ``rows``), each
    part's ``1 / sigma`` to ``inv_std`` (R, blocks)."""
    parts = rows.view(rows.shape[0], blocks, -1)
    var, mean = torch.var_mean(parts, dim=2, correction=0, keepdim=True)
    rstd = var.add_(LAYER_NORM_EPS).rsqrt_()
    centred = normed.view(parts.shape)
    torch.sub(parts, mean, out=centred)
    centred.mul_(rstd)
    inv_std.copy_(rstd.squeeze(2))
    torch.addcmul(bias, normed, weight, out=rows)


def _normalise_backward_(
    grad: Tensor,
    normed: Tensor,
    inv_std: Tensor,
    weight: Tensor,
    d_weight: Tensor,
    d_bias: Tensor,
    blocks: int,
) -> None:
    """The backward of :func:`_normalise_` in place: ``grad`` (R, blocks * H), the gradient of the
    normalisation's output, becomes that of its input; the scale's and shift's gradients are
    added to ``d_weight`` and ``d_bias``."""
    d_weight.add_((grad * normed).sum(0))
    d_bias.add_(grad.sum(0))
    shape = (grad.shape[0], blocks, -1)
    g = (grad * weight).view(shape)
    xhat = normed.view(shape)
    mean_g = g.mean(2, keepdim=True)
    mean_gx = (g * xhat).mean(2, keepdim=True)
    g.sub_(mean_g).sub_(xhat * mean_gx).mul_(inv_std.unsqueeze(2))
    grad.copy_(g.view(grad.shape))


def _nested_weights(weights: list[LevelWeights]) -> list[tuple[Tensor, Tensor | None] | None]:
    """Per level k >= 1: ``[W_ih | W_hh]`` (4H, 2H) and ``b_ih + b_hh`` (or None)."""
    out: list[tuple[Tensor, Tensor | None] | None] = [None]
    for level in weights[1:]:
        out.append((torch.cat([level.weight_ih, level.weight_hh], dim=1), level.combined_bias()))
    return out


def forward(
    x: Tensor,
    weights: list[LevelWeights],
    h0: Tensor,
    c0: Tensor,
    sizes: list[int] | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    save: bool,
    zoneout: Tensor | None = None,
    norms: list[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Saved | None]:
    """The whole forward without autograd (the contract of ``c_loop.forward``). ``zoneout``:
    (D + 1, T, B, H) keep weights in the state dtype, or None (``naive.py``); ``norms``: D levels'
    layer normalisation (None for a level without) in the state dtype, or None."""
    steps, batch, in_size = x.shape
    depth, hidden = c0.shape[0], h0.shape[1]
    packed = sizes is not None and min(sizes) < batch
    level_norms = norms if norms is not None else [None] * depth
    normalised = any(n is not None for n in level_norms)
    saved = empty_saved(
        steps, batch, hidden, depth, x.dtype, x.device, packed, normalised=normalised
    )
    gates, cells, act_cells, inputs, norm_gates, norm_cells, inv_std = saved

    def activate_(k: int, t: int, r: int) -> None:
        """Normalise (where level k does) and activate level k's gates at step t in place."""
        z, ln = gates[k, t, :r], level_norms[k]
        if ln is not None:
            stds = inv_std[k, t, :r, :4]
            _normalise_(z, norm_gates[k, t, :r], stds, ln.gates_weight, ln.gates_bias, 4)
        _activate_gates_(z, activations[k])

    first, last = state_slots(steps, reverse)
    cells[:, first] = c0
    w_ih0, w_hh0 = weights[0].weight_ih, weights[0].weight_hh
    bias0 = weights[0].combined_bias()
    projection = x.reshape(-1, in_size) @ w_ih0.t()
    if bias0 is not None:
        projection += bias0
    gates[0] = projection.view(steps, batch, 4 * hidden)
    nested = _nested_weights(weights)
    out = x.new_zeros(steps, batch, hidden)
    h = h0.clone()
    for t in time_order(steps, reverse):
        prev, new = (t + 1, t) if reverse else (t, t + 1)
        r = batch if sizes is None else sizes[t]
        cells[:, new] = cells[:, prev]  # inactive rows carry their state
        if r == 0:
            continue
        gates[0, t, :r].addmm_(h[:r], w_hh0.t())
        activate_(0, t, r)
        for k in range(1, depth):
            below = gates[k - 1, t, :r]
            i, f, g, _ = below.chunk(4, dim=1)
            level_input = inputs[k - 1, t, :r]
            torch.mul(i, g, out=level_input[:, :hidden])
            torch.mul(f, cells[k - 1, prev, :r], out=level_input[:, hidden:])
            w_cat, bias = cast(tuple[Tensor, Tensor | None], nested[k])  # k >= 1
            z = gates[k, t, :r]
            if bias is None:
                torch.mm(level_input, w_cat.t(), out=z)
            else:
                torch.addmm(bias, level_input, w_cat.t(), out=z)
            activate_(k, t, r)
        i, f, g, _ = gates[depth - 1, t, :r].chunk(4, dim=1)
        c = f * cells[depth - 1, prev, :r] + i * g  # the innermost level adds
        for k in range(depth - 1, -1, -1):  # ascent: c^{k-1} = o_k act_k(c^k), h = o_0 act_0(c^0)
            act_c, ln = act_cells[k, t, :r], level_norms[k]
            act_c.copy_(c)
            if ln is not None:  # the output reads the normalised cell; the carried one is not
                stds = inv_std[k, t, :r, 4:]
                _normalise_(act_c, norm_cells[k, t, :r], stds, ln.cell_weight, ln.cell_bias, 1)
            ACTIVATIONS_INPLACE[activations[k].cell](act_c)
            # the ascent reads the unzoned new cell; only what is carried is mixed
            carried = (
                c if zoneout is None else zoneout_mix(cells[k, prev, :r], c, zoneout[k, t, :r])
            )
            cells[k, new, :r] = carried
            c = gates[k, t, :r, 3 * hidden :] * act_c
        if zoneout is not None:
            c = zoneout_mix(h[:r], c, zoneout[depth, t, :r])
        h[:r] = c
        out[t, :r] = c
    return out, h, cells[:, last].clone(), saved if save else None


def _gate_backward(
    z: Tensor, c_prev: Tensor, d_ig: Tensor, d_fc: Tensor, dz: Tensor, act: LevelActivations
) -> Tensor:
    """Gate gradients of one level at one step from d(i*g) and d(f*c_prev), into ``dz`` (whose
    o part already holds d o by its activated value); returns the gradient of ``c_prev``."""
    i, f, g, o = z.chunk(4, dim=1)
    dz_i, dz_f, dz_g, dz_o = dz.chunk(4, dim=1)
    torch.mul(d_ig, g, out=dz_i)
    torch.mul(d_fc, c_prev, out=dz_f)
    torch.mul(d_ig, i, out=dz_g)
    for part, value, name in ((dz_i, i, act.gate), (dz_f, f, act.gate), (dz_g, g, act.candidate)):
        part.mul_(output_derivative(name, value))
    dz_o.mul_(output_derivative(act.gate, o))
    return d_fc * f


def backward(
    saved: Saved,
    weights: list[LevelWeights],
    sizes: list[int] | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    zoneout: Tensor | None = None,
    norms: list[LevelNorms | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, list[LevelNorms | None]]:
    """The reverse time loop: gate gradients ``dz`` (D, T, B, 4H), and the gradients of h0, c0.
    With ``zoneout`` (as the forward's), a carried state's gradient splits between its new value
    (weight 1 - z) and its previous one (weight z). With ``norms`` (as the forward's), ``dz`` is
    the gradient of the gates before their normalisation, and a fourth result follows: the
    gradients of each level's ``LevelNorms`` (None for a level without)."""
    gates, cells, act_cells, _, norm_gates, norm_cells, inv_std = saved
    depth, steps, batch, four_h = gates.shape
    hidden = four_h // 4
    dz = gates.new_zeros(gates.shape)
    dh, dc = d_hn.clone(), d_cn.clone()
    nested = _nested_weights(weights)
    w_hh0 = weights[0].weight_hh
    level_norms = norms if norms is not None else [None] * depth
    d_norms = [
        None if n is None else LevelNorms._make(map(torch.zeros_like, n)) for n in level_norms
    ]
    for t in time_order(steps, not reverse):
        prev = t + 1 if reverse else t
        r = batch if sizes is None else sizes[t]
        if r == 0:
            continue
        grad = d_out[t, :r] + dh[:r]
        kept: list[Tensor] = []  # the gradients of the previous carried states through zoneout
        if zoneout is not None:
            z = zoneout[:, t, :r]
            kept = [z[k] * dc[k, :r] for k in range(depth)] + [z[depth] * grad]
            grad = (1 - z[depth]) * grad
        for k in range(depth):  # back through the ascent
            act_c = act_cells[k, t, :r]
            dz[k, t, :r, 3 * hidden :] = grad * act_c
            grad = (
                grad * gates[k, t, :r, 3 * hidden :] * output_derivative(activations[k].cell, act_c)
            )
            ln, d_ln = level_norms[k], d_norms[k]
            if ln is not None and d_ln is not None:
                stds = inv_std[k, t, :r, 4:]
                normed = norm_cells[k, t, :r]
                _normalise_backward_(
                    grad, normed, stds, ln.cell_weight, d_ln.cell_weight, d_ln.cell_bias, 1
                )
            grad = grad + (dc[k, :r] if zoneout is None else (1 - z[k]) * dc[k, :r])
        d_ig = d_fc = grad  # the innermost level: c = i*g + f*c_prev
        for k in range(depth - 1, -1, -1):  # descent
            c_prev = cells[k, prev, :r]
            d_prev = _gate_backward(
                gates[k, t, :r], c_prev, d_ig, d_fc, dz[k, t, :r], activations[k]
            )
            ln, d_ln = level_norms[k], d_norms[k]
            if ln is not None and d_ln is not None:
                stds, normed = inv_std[k, t, :r, :4], norm_gates[k, t, :r]
                _normalise_backward_(
                    dz[k, t, :r],
                    normed,
                    stds,
                    ln.gates_weight,
                    d_ln.gates_weight,
                    d_ln.gates_bias,
                    4,
                )
            dc[k, :r] = d_prev if zoneout is None else d_prev + kept[k]
            if k > 0:
                d_both = dz[k, t, :r] @ cast(tuple[Tensor, Tensor | None], nested[k])[0]
                d_ig, d_fc = d_both[:, :hidden], d_both[:, hidden:]
        dh[:r] = dz[0, t, :r] @ w_hh0
        if zoneout is not None:
            dh[:r] += kept[depth]
    if norms is None:
        return dz, dh, dc
    return dz, dh, dc, d_norms
