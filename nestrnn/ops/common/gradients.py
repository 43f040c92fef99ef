"""The gradients every implementation computes the same way, after its backward time loop.

The loop leaves the gradients of every gate pre-activation, ``dz`` (D, T, B, 4H), and of the
initial state. Everything else is a few large GEMMs or sums over all steps at once (never summed
inside the loop, which would make T small GEMMs of what is one big one):

    dx          = dz[0] @ W_ih^0                 (T, B, I)
    dW_ih^0     = sum_t dz[0, t]^T x_t            (4H, I)
    dW_hh^0     = sum_t dz[0, t]^T h_{t-1}        (4H, H)
    [dW_ih^k | dW_hh^k] = sum_t dz[k, t]^T [x~ | h~]^{k-1}_t   (4H, 2H), k >= 1
    db^k        = sum_t sum_b dz[k, t, b]         (4H,), the same for b_ih and b_hh
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestrnn.ops.common.levels import LevelWeights


def previous_hidden(
    out: Tensor, h0: Tensor, batch_sizes: Tensor | None, reverse: bool
) -> list[tuple[slice, Tensor]]:
    """h_{t-1} of every step t, as (time range, (n, B, H)) pieces, from the output and h0.

    A packed batch is sorted by length, so in forward order a row active at step t was active at
    t-1 and its h_{t-1} is in the output. In reverse order a row first becomes active at its last
    step, where h_{t-1} is h0. Rows inactive at a step get zero gate gradients, so what stands in
    their place only has to be finite (the output holds zeros there).
    """
    steps, batch = out.shape[0], out.shape[1]
    first = h0.unsqueeze(0)
    if not reverse:
        return [(slice(0, 1), first), (slice(1, steps), out[:-1])]
    later = out[1:]
    if batch_sizes is not None:
        rows = batch_sizes[1:].unsqueeze(1) > torch.arange(batch, device=batch_sizes.device)
        rows = rows.unsqueeze(2)
        later = later.where(rows.to(out.device), first)
    return [(slice(0, steps - 1), later), (slice(steps - 1, steps), first)]


def input_gradient(dz: Tensor, weight_ih: Tensor) -> Tensor:
    """``dz @ W_ih``: (rows, 4H) @ (4H, I) -> (rows, I), contiguous.

    In float32 on CPU the weight gets zero columns up to a multiple of 16 first: MKL's SGEMM is
    faster at such widths (I = 75, 150, 250, 300 with 4H = 300 or 1024) by far more than the
    copy out of the padded result costs. In float64 padding was slower, so it is not done.
    """
    width = weight_ih.shape[1]
    padded = -(-width // 16) * 16
    if weight_ih.dtype != torch.float32 or weight_ih.device.type != "cpu" or padded == width:
        return dz.mm(weight_ih)
    wide = weight_ih.new_zeros(weight_ih.shape[0], padded)
    wide[:, :width] = weight_ih
    return dz.mm(wide)[:, :width].contiguous()


def parameter_gradients(
    x: Tensor,
    h0: Tensor,
    out: Tensor,
    weights: list[LevelWeights],
    inputs: Tensor,
    dz: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    needs_x: bool,
    needs: list[tuple[bool, bool, bool]],
) -> tuple[Tensor | None, list[tuple[Tensor | None, Tensor | None, Tensor | None]]]:
    """``dx`` and, per level, ``(dW_ih, dW_hh, db)`` (None where ``needs`` says no).

    ``inputs`` and ``dz`` are ``Saved.inputs`` and the loop's gate gradients (see the module
    docstring); the GEMMs run in the dtype of ``inputs`` (the saved operand dtype).
    """
    steps, batch, in_size = x.shape
    hidden = h0.shape[1]
    rows = steps * batch
    gemm = inputs.dtype
    if steps == 0:  # nothing ran: every gradient is zero
        zero: list[tuple[Tensor | None, Tensor | None, Tensor | None]]
        zero = [
            (torch.zeros_like(w_ih), torch.zeros_like(w_hh), w_hh.new_zeros(4 * hidden))
            for w_ih, w_hh, _, _ in weights
        ]
        return (torch.zeros_like(x) if needs_x else None), zero
    dz_gemm = dz.to(gemm).view(len(weights), rows, 4 * hidden)
    dx = (
        input_gradient(dz_gemm[0], weights[0].weight_ih.to(gemm)).view(steps, batch, in_size)
        if needs_x
        else None
    )
    grads: list[tuple[Tensor | None, Tensor | None, Tensor | None]] = []
    for k, (need_ih, need_hh, need_b) in enumerate(needs):
        dw_ih = dw_hh = None
        if k == 0:
            if need_ih:
                dw_ih = dz_gemm[0].t().mm(x.reshape(rows, in_size).to(gemm))
            if need_hh:
                dw_hh = dz_gemm.new_zeros(4 * hidden, hidden)
                for span, h in previous_hidden(out, h0, batch_sizes, reverse):
                    dz_span = dz_gemm[0].view(steps, batch, 4 * hidden)[span]
                    dw_hh.addmm_(
                        dz_span.reshape(-1, 4 * hidden).t(), h.reshape(-1, hidden).to(gemm)
                    )
        elif need_ih or need_hh:  # one GEMM for both halves of [W_ih | W_hh]
            both = dz_gemm[k].t().mm(inputs[k - 1].view(rows, 2 * hidden))
            dw_ih, dw_hh = both[:, :hidden], both[:, hidden:]
        db = dz[k].sum((0, 1)) if need_b else None
        grads.append((dw_ih, dw_hh, db))
    return dx, grads
