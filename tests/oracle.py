"""An independent step-by-step Nested LSTM, written from the equations of docs/design.md.

It reads parameters by their public names from a state dict and shares no code with the library.
Depth D >= 1; level 0 is the outer LSTM. Float64 tensors; x is (T, B, I), time-major.
"""

from __future__ import annotations

import torch


def _split(v):
    H = v.shape[-1] // 4
    return v[..., :H], v[..., H : 2 * H], v[..., 2 * H : 3 * H], v[..., 3 * H :]


def _affine(params, prefix, x_part, h_part):
    out = x_part @ params[f"{prefix}weight_ih"].T + h_part @ params[f"{prefix}weight_hh"].T
    if f"{prefix}bias_ih" in params:
        out = out + params[f"{prefix}bias_ih"] + params[f"{prefix}bias_hh"]
    return out


def oracle_step(params, suffix, depth, x_t, h_prev, cells_prev):
    """One step of layer/direction ``suffix`` (e.g. "l0", "l1_reverse")."""
    outer = {
        "weight_ih": params[f"weight_ih_{suffix}"],
        "weight_hh": params[f"weight_hh_{suffix}"],
    }
    if f"bias_ih_{suffix}" in params:
        outer["bias_ih"] = params[f"bias_ih_{suffix}"]
        outer["bias_hh"] = params[f"bias_hh_{suffix}"]
    i, f, g, o = _split(_affine(outer, "", x_t, h_prev))
    i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
    if depth == 1:
        g = torch.tanh(g)
    x_tilde = i * g  # level k's input
    h_tilde = f * cells_prev[0]  # level k's "previous hidden state"
    o_gates = [o]
    f_gates = [f]
    i_g = [x_tilde]
    for k in range(1, depth):
        prefix = f"memory_{suffix}." + "inner." * (k - 1)
        ik, fk, gk, ok = _split(_affine(params, prefix, x_tilde, h_tilde))
        ik, fk, gk, ok = torch.sigmoid(ik), torch.sigmoid(fk), torch.tanh(gk), torch.sigmoid(ok)
        o_gates.append(ok)
        f_gates.append(fk)
        i_g.append(ik * gk)
        x_tilde = ik * gk
        h_tilde = fk * cells_prev[k]
    cells = [None] * depth
    cells[depth - 1] = f_gates[depth - 1] * cells_prev[depth - 1] + i_g[depth - 1]
    for k in range(depth - 1, 0, -1):
        cells[k - 1] = o_gates[k] * torch.tanh(cells[k])
    return o_gates[0] * torch.tanh(cells[0]), cells


def oracle_lstm(params, num_layers, bidirectional, depth, x, h0, c0):
    """Whole multi-layer (bi)directional Nested LSTM. h0 (L*dirs, B, H), c0 (D, L*dirs, B, H).

    Returns output (T, B, dirs*H), h_n (L*dirs, B, H), c_n (D, L*dirs, B, H).
    """
    suffixes = ["", "_reverse"] if bidirectional else [""]
    steps = x.shape[0]
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        direction_outputs = []
        for d, sfx in enumerate(suffixes):
            index = layer * len(suffixes) + d
            h = h0[index]
            cells = [c0[k, index] for k in range(depth)]
            outs = [None] * steps
            order = range(steps - 1, -1, -1) if sfx else range(steps)
            for t in order:
                h, cells = oracle_step(params, f"l{layer}{sfx}", depth, layer_input[t], h, cells)
                outs[t] = h
            direction_outputs.append(torch.stack(outs))
            h_n.append(h)
            c_n.append(torch.stack(cells))
        layer_input = torch.cat(direction_outputs, dim=-1)
    return layer_input, torch.stack(h_n), torch.stack(c_n, dim=1)
