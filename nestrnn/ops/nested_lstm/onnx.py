"""The op in ONNX: a translation of ``nestrnn::nested_lstm`` for ``torch.onnx.export(dynamo=True)``.

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=onnx_translation_table())

The input projection of every step is one MatMul; the time loop is unrolled into ONNX ops, one
step of the whole nested cell (every level, the ascent, packed rows carrying their state) after
the other. The exported model is therefore for the sequence length it was exported with: export
with a static time dimension (a dynamic one is refused with a clear error). Exported graphs hold
the inference op (see ``nestrnn.ops.nested_lstm.nested_lstm``). Needs the ``onnxscript`` package,
imported by this module only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from onnxscript import opset18

from nestrnn.ops.common.levels import decode_activations, time_order

#: onnxscript types each operator's inputs by ONNX element type, which the traced values here
#: do not carry (the exporter checks the graph itself)
op: Any = opset18

__all__ = ["nested_lstm_onnx", "onnx_translation_table"]


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    return {torch.ops.nestrnn.nested_lstm.default: nested_lstm_onnx}


def _activate(name: str, x):
    if name == "identity":
        return x
    if name == "hardtanh":
        return op.Clip(x, op.Constant(value_float=-1.0), op.Constant(value_float=1.0))
    return {"sigmoid": op.Sigmoid, "tanh": op.Tanh, "relu": op.Relu, "softsign": op.Softsign}[name](
        x
    )


def _present(value) -> bool:
    """False for the empty placeholder of a missing bias."""
    return value.shape is None or 0 not in tuple(value.shape)


def _static_steps(x) -> int:
    steps = x.shape[0] if x.shape is not None else None
    if not isinstance(steps, int):
        raise ValueError(
            "the ONNX translation of nestrnn::nested_lstm unrolls the time loop, so the sequence "
            f"length must be static; got time dimension {steps!r}: export without a dynamic "
            "dimension for time (one model per sequence length)"
        )
    return steps


def nested_lstm_onnx(
    x, weights: Sequence, h0, c0, batch_sizes, reverse: bool, activations: str, backend: str
):
    """The translation of ``nestrnn::nested_lstm`` (arguments as in ``op.py``)."""
    levels = decode_activations(activations)
    depth, steps = len(levels), _static_steps(x)
    projection = op.MatMul(x, op.Transpose(weights[0], perm=[1, 0]))  # (T, B, 4H)
    for bias in weights[2:4]:
        if _present(bias):
            projection = op.Add(projection, bias)
    recurrent = [op.Transpose(weights[1], perm=[1, 0])]  # level 0: W_hh^T; level k: [W_ih | W_hh]^T
    biases = [None]
    for k in range(1, depth):
        w_ih, w_hh, b_ih, b_hh = weights[4 * k : 4 * k + 4]
        recurrent.append(op.Transpose(op.Concat(w_ih, w_hh, axis=1), perm=[1, 0]))
        present = [b for b in (b_ih, b_hh) if _present(b)]
        biases.append(
            None if not present else present[0] if len(present) == 1 else op.Add(*present)
        )
    rows = None
    if batch_sizes is not None:  # (B, 1) row indices, compared with a step's active count
        batch = op.Gather(op.Shape(x), op.Constant(value_int=1))
        rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), batch, op.Constant(value_int=1)),
                            op.Constant(value_ints=[1]))  # fmt: skip
    h = h0
    cells = [op.Gather(c0, op.Constant(value_int=k), axis=0) for k in range(depth)]
    outputs = [None] * steps
    for t in time_order(steps, reverse):
        step = op.Gather(projection, op.Constant(value_int=t), axis=0)
        level_input = op.Add(step, op.MatMul(h, recurrent[0]))
        gated_inputs: list[Any] = []
        gated_cells: list[Any] = []
        out_gates: list[Any] = []
        for k, act in enumerate(levels):
            if k > 0:
                both = op.Concat(gated_inputs[-1], gated_cells[-1], axis=1)
                level_input = op.MatMul(both, recurrent[k])
                if biases[k] is not None:
                    level_input = op.Add(level_input, biases[k])
            i, f, g, o = op.Split(level_input, axis=1, num_outputs=4)
            i, f, o = (_activate(act.gate, v) for v in (i, f, o))
            gated_inputs.append(op.Mul(i, _activate(act.candidate, g)))
            gated_cells.append(op.Mul(f, cells[k]))
            out_gates.append(o)
        new_cells = [op.Add(gated_cells[-1], gated_inputs[-1])]  # the innermost level adds
        for k in range(depth - 1, 0, -1):  # ascent: c^{k-1} = o_k act_k(c^k)
            new_cells.insert(0, op.Mul(out_gates[k], _activate(levels[k].cell, new_cells[0])))
        h_new = op.Mul(out_gates[0], _activate(levels[0].cell, new_cells[0]))
        if rows is None:
            h, cells, outputs[t] = h_new, new_cells, h_new
        else:  # inactive rows keep their state and output zero
            active = op.Less(rows, op.Gather(batch_sizes, op.Constant(value_int=t)))
            outputs[t] = op.Where(active, h_new, op.Sub(h_new, h_new))
            h = op.Where(active, h_new, h)
            cells = [op.Where(active, new, old) for new, old in zip(new_cells, cells)]
    axis0 = op.Constant(value_ints=[0])
    if steps == 0:
        out = op.Expand(
            op.Sub(h0, h0), op.Concat(op.Constant(value_ints=[0]), op.Shape(h0), axis=0)
        )
    else:
        out = op.Concat(*(op.Unsqueeze(o, axis0) for o in outputs), axis=0)
    c_n = op.Concat(*(op.Unsqueeze(c, axis0) for c in cells), axis=0)
    return out, h, c_n
