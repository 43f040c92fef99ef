"""The inference op as core ATen ops, for ``ExportedProgram.run_decompositions()`` and ONNX export.

``nestrnn::nested_lstm`` stays one opaque op in eager mode, under ``torch.compile`` and in the
graph ``torch.export.export`` records. Deployment targets that accept only core ATen (an exported
program after ``run_decompositions()``, ``torch.onnx.export(dynamo=True)``) need it spelled out:
this module gives the op a CompositeImplicitAutograd kernel in the Python dispatcher, which is
what ``torch.export.default_decompositions()`` (and so ``run_decompositions()`` with no argument,
and the ONNX exporter's table) collects for custom operators. Eager calls never reach it: the
op's own autograd and backend kernels take precedence over a CompositeImplicitAutograd kernel,
and ``torch.compile`` records the op whole (the kernel declines outside ``torch.export``).

The decomposition is one ``scan`` (``torch.ops.higher_order.scan``) over time whose body is one
step of the reference cell (``ops/common/reference.py``: ``nested_cell_step``): the graph does not grow with the sequence
length, a dynamic time dimension stays dynamic, and ONNX receives a ``Scan``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan_op
from torch._library.utils import get_layout_constraint_tag
from torch._subclasses.fake_tensor import FakeTensor

from nestrnn.ops.common.levels import LevelNorms, decode_activations, state_dtype
from nestrnn.ops.common.reference import nested_cell_step
from nestrnn.ops.nested_lstm import op, projected  # noqa: F401 (defines the second op registered below)

__all__ = ["nested_lstm_decomposed", "projected_decomposed"]


def _only_shapes_wanted(x: Tensor) -> bool:
    """True when fake tensors flow with nothing recording a graph: fake-tensor propagation
    prefers a CompositeImplicitAutograd kernel to the op's fake implementation, and would
    otherwise trace the whole time loop just to learn three output shapes (and fix a dynamic
    sequence length while doing so)."""
    proxy = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    return isinstance(x, FakeTensor) and proxy is None


def nested_lstm_decomposed(
    x: Tensor,
    weights: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    backend: str,
    zoneout: Tensor | None = None,
    norms: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``nestrnn::nested_lstm`` (arguments as in ``op.py``) in core ATen ops and one scan."""
    operator = torch.ops.nestrnn.nested_lstm.default
    return _decomposed(
        operator, x, weights, None, h0, c0, batch_sizes, reverse, activations, zoneout, norms
    )


def projected_decomposed(
    x: Tensor,
    weights: Sequence[Tensor],
    weight_hr: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``nestrnn::nested_lstm_projected`` (arguments as in ``projected.py``), likewise."""
    operator = torch.ops.nestrnn.nested_lstm_projected.default
    return _decomposed(operator, x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations)


def _kept_whole(operator: torch._ops.OpOverload) -> Any:
    """Outside ``torch.export`` the op stays whole (its fast loops): ``NotImplemented`` tells a
    tracer that tries this decomposition (``torch.compile``'s, and Inductor's table, which lists
    every CompositeImplicitAutograd op that existed when Inductor was imported) to record the op
    as it is. Inductor then runs it as an external kernel, which it allows for an op in its
    decomposition table only when told so: without this, ``torch.compile`` of a model whose
    graph holds the op stops with "both a fallback and a decomp for same op"."""
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is not None and operator not in lowering.lowerings:
        tag = get_layout_constraint_tag(operator, with_default=True)
        lowering.make_fallback(
            operator,
            layout_constraint=lowering.tag_to_layout_constraint(tag),
            override_decomp=True,
        )
    return NotImplemented


def _decomposed(
    operator: torch._ops.OpOverload,
    x: Tensor,
    weights: Sequence[Tensor],
    weight_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    zoneout: Tensor | None = None,
    norms: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The scan of both ops; ``weight_hr`` (P, H) projects each step's h, as nn.LSTM's;
    ``zoneout`` (D + 1, T, B, H) or None, scanned along T like x; ``norms`` the op's flat layer
    normalisation parameters or None, passed to the body after the weights."""
    if _only_shapes_wanted(x):
        return op.fake_outputs(x, h0, c0)
    if not torch.compiler.is_exporting():
        return _kept_whole(operator)
    dtype, compute = x.dtype, state_dtype(x.dtype)  # half precision runs in float32, as the op
    flat = [w.to(compute) for w in weights]
    n_weights = len(flat)
    # only the levels that normalise: the scan refuses one tensor given twice (empty placeholders)
    flat_norms = list(norms or [])
    normed_levels = [k for k in range(len(flat_norms) // 4) if flat_norms[4 * k].numel()]
    flat.extend(flat_norms[4 * k + n].to(compute) for k in normed_levels for n in range(4))
    if weight_hr is not None:  # the scan's last input
        flat.append(weight_hr.to(compute))
    acts = decode_activations(activations)
    batch = x.shape[1]
    # scan wants fresh contiguous carries (exported states are often views of hx)
    h_init = h0.to(compute).clone(memory_format=torch.contiguous_format)
    c_init = c0.to(compute).clone(memory_format=torch.contiguous_format)
    xs = [x.to(compute)] if batch_sizes is None else [x.to(compute), batch_sizes]
    if zoneout is not None:  # the scan's last scanned input, time first: step t gets (D + 1, B, H)
        xs.append(zoneout.to(compute).transpose(0, 1))
    if reverse:
        xs = [t.flip(0) for t in xs]

    def step(h: Tensor, c: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # the weights come in as the scan's own inputs: a traced body may not close over
        # tensors of the graph around it
        inputs, given = rest[: len(xs)], rest[len(xs) :]
        level_weights, w_hr = (given, None) if weight_hr is None else (given[:-1], given[-1])
        level_weights, given_norms = level_weights[:n_weights], level_weights[n_weights:]
        level_norms: list[LevelNorms | None] = [None] * (n_weights // 4)
        for n, k in enumerate(normed_levels):
            level_norms[k] = LevelNorms._make(given_norms[4 * n : 4 * n + 4])
        keep = None if zoneout is None else inputs[-1].unbind(0)
        h_new, cells = nested_cell_step(
            inputs[0],
            h,
            c.unbind(0),
            op.levels_of(level_weights),
            acts,
            w_hr,
            keep,
            level_norms if normed_levels else None,
        )
        c_new = torch.stack(cells)
        if batch_sizes is None:
            return h_new, c_new, h_new.clone()
        # a packed batch: rows past this step's active count keep their state and output zero
        active = torch.arange(batch, device=x.device) < inputs[1].to(x.device)  # batch_sizes
        rows = active.unsqueeze(1)
        return (
            torch.where(rows, h_new, h),
            torch.where(rows, c_new, c),
            torch.where(rows, h_new, torch.zeros_like(h_new)),
        )

    # scan_op, not torch._higher_order_ops.scan.scan: the latter runs the loop through
    # torch.compile, whose frame cache outlives this export; a later export of the same shapes
    # checks that cache's guards against its symbolic sizes and so fixes a dynamic length
    h_n, c_n, out = scan_op(step, [h_init, c_init], xs, additional_inputs=tuple(flat))
    if reverse:
        out = out.flip(0)
    return out.to(dtype), h_n.to(dtype), c_n.to(dtype)


torch.ops.nestrnn.nested_lstm.default.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(
    nested_lstm_decomposed
)
torch.ops.nestrnn.nested_lstm_projected.default.py_impl(
    torch._C.DispatchKey.CompositeImplicitAutograd
)(projected_decomposed)
