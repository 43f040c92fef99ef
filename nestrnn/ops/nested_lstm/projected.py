"""A nested-LSTM layer direction with nn.LSTM's projection (``proj_size > 0``, ``weight_hr``).

The whole-sequence kernels have no projection, so the computation is the reference's
(``naive.nested_lstm_naive`` with ``weight_hr``). Eager mode runs it directly, through autograd.
Under ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` (not the ONNX exporter, which
records the steps) it runs as two custom operators instead, so that the time loop is not unrolled
into the graph: an unrolled loop fixes the sequence length, which made torch.compile compile again
for every new length (and give up after eight) and a dynamic-length export fail.

    nestrnn::nested_lstm_projected           output (T, B, P), h_n (B, P), c_n (D, B, H)
    nestrnn::nested_lstm_projected_backward  gradients of x, every weight, weight_hr, h0 and c0

The backward recomputes the reference with autograd; a backward that records its graph
(``create_graph=True``) differentiates the reference in the graph instead, exact at every order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nestrnn.ops.common.levels import (
    LevelActivations,
    LevelWeights,
    decode_activations,
    encode_activations,
)
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive
from nestrnn.ops.nested_lstm.op import flat_weights, levels_of


def projected_nested_lstm(
    x: Tensor,
    weights: list[LevelWeights],
    weight_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: tuple[LevelActivations, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one projected layer (shapes as in ``naive.py``, h P = proj_size wide)."""
    recorded = (
        torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    )
    # ONNX has no translation of the operator: its exporter records the steps, unrolled for the
    # sequence length given (as the whole-sequence op's translation does)
    if not recorded or torch.onnx.is_in_onnx_export():
        return nested_lstm_naive(x, weights, h0, c0, batch_sizes, reverse, activations, weight_hr)
    return torch.ops.nestrnn.nested_lstm_projected(
        x,
        flat_weights(weights, x),
        weight_hr,
        h0,
        c0,
        batch_sizes,
        bool(reverse),
        encode_activations(activations),
    )


def _reference(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations):
    return nested_lstm_naive(
        x,
        levels_of(weights),
        h0,
        c0,
        batch_sizes,
        reverse,
        decode_activations(activations),
        weight_hr,
    )


@torch.library.custom_op("nestrnn::nested_lstm_projected", mutates_args=())
def projected_op(
    x: Tensor,
    weights: Sequence[Tensor],
    weight_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Output (T, B, P), h_n (B, P), c_n (D, B, H); ``weights`` as the op's (``op.flat_weights``)."""
    with torch.no_grad():
        out, h_n, c_n = _reference(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations)
    # a custom operator's outputs must not alias its inputs (the reference passes h0 and c0
    # through when there are no steps)
    return out.clone(), h_n.clone(), c_n.clone()


@projected_op.register_fake
def _(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations):
    return (
        x.new_empty(x.shape[0], x.shape[1], h0.shape[1]),
        torch.empty_like(h0),
        torch.empty_like(c0),
    )


def _gradients(inputs, grads) -> list[Tensor]:
    """Gradients of every tensor of ``inputs`` (x, weights..., weight_hr, h0, c0) for the output
    gradients ``grads``, from the reference. ``torch.func.vjp``: inside an operator autograd is
    off, and a functorch transform works there all the same."""
    x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations = inputs

    def reference(x, weight_hr, h0, c0, *weights):
        return _reference(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations)

    vjp = torch.func.vjp(reference, x, weight_hr, h0, c0, *weights)[1]
    dx, d_hr, dh0, dc0, *d_weights = vjp(tuple(grads))
    return [dx, *d_weights, d_hr, dh0, dc0]


def _recorded_gradients(inputs, grads) -> list[Tensor | None]:
    """As ``_gradients``, as a graph that can be differentiated again (``create_graph=True``):
    the reference's own autograd graph, exact at every order. None where no gradient is needed."""
    x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations = inputs
    tensors = [x, *weights, weight_hr, h0, c0]
    results = _reference(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations)
    wanted = [t for t in tensors if t.requires_grad]
    found = iter(
        torch.autograd.grad(
            results, wanted, grads, create_graph=True, allow_unused=True, materialize_grads=True
        )
        if wanted
        else []
    )
    return [next(found) if t.requires_grad else None for t in tensors]


@torch.library.custom_op("nestrnn::nested_lstm_projected_backward", mutates_args=())
def projected_backward_op(
    x: Tensor,
    weights: Sequence[Tensor],
    weight_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    """Gradients of x, every weight, weight_hr, h0 and c0."""
    inputs = (x, list(weights), weight_hr, h0, c0, batch_sizes, reverse, activations)
    dx, *d_weights, d_hr, dh0, dc0 = _gradients(inputs, (d_out, d_hn, d_cn))
    return dx, d_weights, d_hr, dh0, dc0


@projected_backward_op.register_fake
def _(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations, d_out, d_hn, d_cn):
    like = torch.empty_like
    return like(x), [like(w) for w in weights], like(weight_hr), like(h0), like(c0)


def _setup(ctx, inputs, output) -> None:
    x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations = inputs
    packed = [] if batch_sizes is None else [batch_sizes]
    ctx.save_for_backward(x, weight_hr, h0, c0, *packed, *weights)
    ctx.packed, ctx.reverse, ctx.activations = bool(packed), reverse, activations


def _backward(ctx, d_out, d_hn, d_cn):
    x, weight_hr, h0, c0, *rest = ctx.saved_tensors
    batch_sizes = rest.pop(0) if ctx.packed else None
    inputs = (x, rest, weight_hr, h0, c0, batch_sizes, ctx.reverse, ctx.activations)
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
        dx, *d_weights, d_hr, dh0, dc0 = _recorded_gradients(inputs, (d_out, d_hn, d_cn))
    else:
        dx, d_weights, d_hr, dh0, dc0 = torch.ops.nestrnn.nested_lstm_projected_backward(
            *inputs, d_out, d_hn, d_cn
        )
    return dx, d_weights, d_hr, dh0, dc0, None, None, None


projected_op.register_autograd(_backward, setup_context=_setup)
