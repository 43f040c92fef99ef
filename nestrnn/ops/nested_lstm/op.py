"""The nested-LSTM op as PyTorch custom operators, so that eager mode, autograd, ``torch.compile``,
``torch.export``, ONNX export, ``torch.jit.trace``, ``torch.func`` and autocast all see one opaque
op with known output shapes:

    nestrnn::nested_lstm           inference: output, h_n, c_n
    nestrnn::nested_lstm_train     the same plus the tensors the backward needs (layout.Saved)
    nestrnn::nested_lstm_backward  gradients of x, h0, c0 and every weight

Each has a fake implementation (shapes and dtypes only) and the first two have registered autograd
formulas (the inference op's recomputes the forward with saving, for graphs exported for inference
and then differentiated). A backward that records its own graph (``create_graph=True``: gradient
penalties, second derivatives) differentiates the reference instead, which is exact at every order. Which implementation runs inside is decided by ``planning.plan``.

``zoneout`` (last, optional): (D + 1, T, B, H) keep weights of the carried cells and h
(``naive.py``, docs/design.md), any floating dtype and strides along its first three dimensions;
it gets no gradient.

``norms`` (after it, optional): the flat list of every level's layer-normalisation parameters
(``LevelNorms``: gates_weight, gates_bias (4H,), cell_weight, cell_bias (H,)), four a level, a
level without normalisation given as four tensors with no elements; they get gradients.

Arguments the custom-op schema cannot express directly: ``weights`` is the flat list of every
level's (weight_ih, weight_hh, bias_ih, bias_hh), a missing bias given as a tensor with no
elements; ``activations`` is ``layout.encode_activations``'s string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from nestrnn.ops.common.gradients import parameter_gradients
from nestrnn.ops.common.levels import (
    LevelNorms,
    LevelWeights,
    decode_activations,
    operand_dtype,
    state_dtype,
)
from nestrnn.ops.nested_lstm import c_loop, torch_loop, torch_lstm
from nestrnn.ops.nested_lstm.layout import Saved, empty_saved, saved_shapes
from nestrnn.ops.nested_lstm.library import refuse_foreign_definition
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive
from nestrnn.ops.nested_lstm.planning import fallback_choice, mark_broken, plan

ForwardResult = tuple[Tensor, Tensor, Tensor, Saved | None]


def levels_of(flat: Sequence[Tensor]) -> list[LevelWeights]:
    """The op's flat weight list as LevelWeights (an empty bias tensor is no bias)."""
    missing = [None if t.numel() == 0 and n % 4 >= 2 else t for n, t in enumerate(flat)]
    return [LevelWeights._make(missing[n : n + 4]) for n in range(0, len(flat), 4)]


def flat_weights(weights: Sequence[LevelWeights], like: Tensor) -> list[Tensor]:
    """Inverse of :func:`levels_of`."""
    return [like.new_empty(0) if w is None else w for level in weights for w in level]


def norms_of(flat: Sequence[Tensor] | None) -> list[LevelNorms | None] | None:
    """The op's flat ``norms`` as one ``LevelNorms`` a level (None for a level given empty
    tensors), or None where no level normalises."""
    if flat is None:
        return None
    levels = [
        None if flat[n].numel() == 0 else LevelNorms._make(flat[n : n + 4])
        for n in range(0, len(flat), 4)
    ]
    return levels if any(n is not None for n in levels) else None


def flat_norms(norms: Sequence[LevelNorms | None], like: Tensor) -> list[Tensor]:
    """Inverse of :func:`norms_of`."""
    return [
        t for n in norms for t in (n if n is not None else [like.new_empty(0) for _ in range(4)])
    ]


# ------------------------------------------------------------------------------- running


def _run_forward(
    implementation: str, x, levels, h0, c0, batch_sizes, reverse, activations, save, zoneout, norms
) -> ForwardResult:
    if implementation == "torch_lstm":  # never planned with zoneout or norms
        return (*torch_lstm.forward(x, levels[0], h0, c0, batch_sizes, reverse), None)
    sizes = None if batch_sizes is None else batch_sizes.tolist()
    compute = state_dtype(x.dtype)  # half precision runs in float32 here
    keep = _zoneout_in(zoneout, compute)
    norms = _cast_norms(norms, compute)
    if implementation == "triton":
        from nestrnn.ops.nested_lstm import triton_loop  # imports Triton

        return triton_loop.forward(
            x, levels, h0, c0, batch_sizes, reverse, activations, save, zoneout=keep, norms=norms
        )
    loop = c_loop if implementation == "c_loop" else torch_loop
    extra = () if norms is None else (norms,)
    out, h_n, c_n, saved = loop.forward(
        x.to(compute),
        _cast(levels, compute),
        h0.to(compute),
        c0.to(compute),
        sizes,
        reverse,
        activations,
        save,
        keep,
        *extra,
    )
    operand = operand_dtype(x.dtype, x.device)
    if saved is not None and saved.inputs.dtype != operand:
        saved = saved._replace(inputs=saved.inputs.to(operand))
    return out.to(x.dtype), h_n.to(x.dtype), c_n.to(x.dtype), saved


def _zoneout_in(zoneout: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The zoneout weights as every loop reads them: in the state dtype, its last dimension
    contiguous (the kernels take the strides of the other three, so an evaluation's rates
    expanded with stride 0 along T and B stay unexpanded)."""
    if zoneout is None:
        return None
    zoneout = zoneout.to(dtype)
    return zoneout if zoneout.stride(3) == 1 else zoneout.contiguous()


def _cast_norms(
    norms: list[LevelNorms | None] | None, dtype: torch.dtype
) -> list[LevelNorms | None] | None:
    if norms is None:
        return None
    return [None if n is None else LevelNorms._make(t.to(dtype) for t in n) for n in norms]


def _cast(levels: list[LevelWeights], dtype: torch.dtype) -> list[LevelWeights]:
    return [LevelWeights._make(None if w is None else w.to(dtype) for w in lw) for lw in levels]


def _with_fallback(
    run, x, hidden, batch_sizes, reverse, activations, training, backend, zoneout=False, norms=False
):
    """Run the planned implementation; a Triton failure is recorded and ``fallback_choice`` runs.

    Only what a compile or launch raises counts as a failure (``triton_loop.LAUNCH_ERRORS``); any
    other error is a bug and propagates."""
    planned = plan(
        x,
        batch_sizes,
        reverse,
        activations,
        training,
        backend,
        hidden=hidden,
        zoneout=zoneout,
        norms=norms,
    )
    if planned.implementation != "triton":
        return run(planned.implementation)
    from nestrnn.ops.nested_lstm import triton_loop  # imports Triton

    triton_loop.cuda_graph_setting()  # a bad setting is the user's error, not a kernel failure
    try:
        return run("triton")
    except triton_loop.LAUNCH_ERRORS as err:  # a kernel that does not compile or launch here
        mark_broken("triton", f"{type(err).__name__}: {err}")
        return run(fallback_choice(x, batch_sizes, reverse, activations, training, zoneout, norms))


def forward(
    x: Tensor,
    weights: Sequence[Tensor],
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    backend: str,
    save: bool,
    zoneout: Tensor | None = None,
    norms: Sequence[Tensor] | None = None,
) -> ForwardResult:
    """The forward of the op on real tensors (no autograd)."""
    levels, acts, level_norms = levels_of(weights), decode_activations(activations), norms_of(norms)
    steps, batch, hidden, depth = x.shape[0], x.shape[1], h0.shape[1], c0.shape[0]
    normed = level_norms is not None
    if steps == 0 or batch == 0:  # nothing to compute (the kernels need work): the state passes
        saved = (
            empty_saved(steps, batch, hidden, depth, x.dtype, x.device, False, normalised=normed)
            if save
            else None
        )
        return x.new_zeros(steps, batch, hidden), h0.clone(), c0.clone(), saved

    def run(implementation: str) -> ForwardResult:
        return _run_forward(
            implementation,
            x,
            levels,
            h0,
            c0,
            batch_sizes,
            reverse,
            acts,
            save,
            zoneout,
            level_norms,
        )

    zoned = zoneout is not None
    return _with_fallback(run, x, hidden, batch_sizes, reverse, acts, save, backend, zoned, normed)


def backward(
    x: Tensor,
    weights: Sequence[Tensor],
    h0: Tensor,
    out: Tensor,
    saved: Saved,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    backend: str,
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    needs: Sequence[bool],
    zoneout: Tensor | None = None,
    norms: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """The backward of the op on real tensors. ``needs``: x, h0, c0, then one per weight, then
    one per tensor of ``norms`` (if given). Gradients that are not needed (or of a missing bias or
    norm) are tensors with no elements; the last list holds the norms' (empty without)."""
    levels, acts = levels_of(weights), decode_activations(activations)
    compute = state_dtype(x.dtype)
    keep = _zoneout_in(zoneout, compute)
    level_norms = _cast_norms(norms_of(norms), compute)

    def run(implementation: str) -> tuple:
        if implementation == "triton":
            from nestrnn.ops.nested_lstm import triton_loop

            return triton_loop.backward(
                saved,
                levels,
                batch_sizes,
                reverse,
                acts,
                d_out,
                d_hn,
                d_cn,
                zoneout=keep,
                norms=level_norms,
            )
        loop = c_loop if implementation == "c_loop" else torch_loop
        sizes = None if batch_sizes is None else batch_sizes.tolist()
        grads = (d_out.to(compute), d_hn.to(compute), d_cn.to(compute))
        extra = () if level_norms is None else (level_norms,)
        return loop.backward(
            saved, _cast(levels, compute), sizes, reverse, acts, *grads, keep, *extra
        )

    d_level_norms: list[LevelNorms | None] = [None] * len(levels)
    if x.shape[0] == 0 or x.shape[1] == 0:  # the forward passed the state through
        dz, dh0, dc0 = saved.gates.new_zeros(saved.gates.shape), d_hn, d_cn
        if level_norms is not None:
            d_level_norms = [
                None if n is None else LevelNorms._make(map(torch.zeros_like, n))
                for n in level_norms
            ]
    else:
        hidden = h0.shape[1]
        result = _with_fallback(
            run,
            x,
            hidden,
            batch_sizes,
            reverse,
            acts,
            True,
            backend,
            zoneout is not None,
            level_norms is not None,
        )
        dz, dh0, dc0 = result[:3]
        if level_norms is not None:
            d_level_norms = result[3]
    per_level = [tuple(needs[3 + 4 * k : 3 + 4 * k + 4]) for k in range(len(levels))]
    dx, level_grads = parameter_gradients(
        x,
        h0,
        out,
        levels,
        saved.inputs,
        dz,
        batch_sizes,
        reverse,
        needs[0],
        [(ih, hh, b_ih or b_hh) for ih, hh, b_ih, b_hh in per_level],
    )
    none = x.new_empty(0)
    d_weights: list[Tensor] = []
    for level, level_needs, (dw_ih, dw_hh, db) in zip(levels, per_level, level_grads):
        for w, need, grad in zip(level, level_needs, (dw_ih, dw_hh, db, db)):
            useful = need and w is not None and grad is not None
            d_weights.append(
                cast(Tensor, grad).to(cast(Tensor, w).dtype, copy=True) if useful else none.clone()
            )
    norm_needs = needs[3 + len(weights) :]
    d_norms = [
        grad.to(t.dtype, copy=True) if need and t.numel() and grad is not None else none.clone()
        for t, need, grad in zip(
            norms or [],
            norm_needs,
            [g for d in d_level_norms for g in (d if d is not None else [None] * 4)],
        )
    ]
    return (
        dx.to(x.dtype) if dx is not None else none.clone(),
        dh0.to(h0.dtype, copy=True) if needs[1] else none.clone(),
        dc0.to(h0.dtype, copy=True) if needs[2] else none.clone(),
        d_weights,
        d_norms,
    )


# ------------------------------------------------------------------------------- operators

refuse_foreign_definition()  # the library for processes without nestrnn, loaded first

# Written out: schema inference has no optional tensor list (``norms``). The inference op's is
# also torch_library.cpp's, which must stay the same.
_ARGUMENTS = (
    "Tensor x, Tensor[] weights, Tensor h0, Tensor c0, Tensor? batch_sizes, bool reverse, "
    "str activations, str backend"
)
_OPTIONAL = "Tensor? zoneout=None, Tensor[]? norms=None"
_SCHEMAS = {
    "nested_lstm": f"({_ARGUMENTS}, {_OPTIONAL}) -> (Tensor, Tensor, Tensor)",
    "nested_lstm_train": f"({_ARGUMENTS}, {_OPTIONAL}) -> ({', '.join(['Tensor'] * 10)})",
    "nested_lstm_backward": (
        "(Tensor x, Tensor[] weights, Tensor h0, Tensor out, Tensor gates, Tensor cells, "
        "Tensor act_cells, Tensor inputs, Tensor norm_gates, Tensor norm_cells, Tensor inv_std, "
        "Tensor? batch_sizes, bool reverse, str activations, str backend, Tensor d_out, "
        f"Tensor d_hn, Tensor d_cn, bool[] needs, {_OPTIONAL}) "
        "-> (Tensor, Tensor, Tensor, Tensor[], Tensor[])"
    ),
}


@torch.library.custom_op("nestrnn::nested_lstm", mutates_args=(), schema=_SCHEMAS["nested_lstm"])
def nested_lstm_op(
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
    """One direction of a Nested LSTM layer, inference: output (T, B, H), h_n, c_n (D, B, H)."""
    with _own_dtypes(x):
        out, h_n, c_n, _ = forward(
            x, weights, h0, c0, batch_sizes, reverse, activations, backend, False, zoneout, norms
        )
    return out, h_n, c_n


@torch.library.custom_op(
    "nestrnn::nested_lstm_train", mutates_args=(), schema=_SCHEMAS["nested_lstm_train"]
)
def nested_lstm_train_op(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """As ``nested_lstm``, followed by the seven ``layout.Saved`` tensors."""
    with _own_dtypes(x):
        out, h_n, c_n, saved = forward(
            x, weights, h0, c0, batch_sizes, reverse, activations, backend, True, zoneout, norms
        )
    return out, h_n, c_n, *cast(Saved, saved)  # saved, as asked


@torch.library.custom_op(
    "nestrnn::nested_lstm_backward", mutates_args=(), schema=_SCHEMAS["nested_lstm_backward"]
)
def nested_lstm_backward_op(
    x: Tensor,
    weights: Sequence[Tensor],
    h0: Tensor,
    out: Tensor,
    gates: Tensor,
    cells: Tensor,
    act_cells: Tensor,
    inputs: Tensor,
    norm_gates: Tensor,
    norm_cells: Tensor,
    inv_std: Tensor,
    batch_sizes: Tensor | None,
    reverse: bool,
    activations: str,
    backend: str,
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
    needs: Sequence[bool],
    zoneout: Tensor | None = None,
    norms: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Gradients of x, h0, c0, every weight and every norm (see ``backward``)."""
    saved = Saved(gates, cells, act_cells, inputs, norm_gates, norm_cells, inv_std)
    with _own_dtypes(x):
        return backward(
            x,
            weights,
            h0,
            out,
            saved,
            batch_sizes,
            reverse,
            activations,
            backend,
            d_out,
            d_hn,
            d_cn,
            needs,
            zoneout,
            norms,
        )


def _own_dtypes(x: Tensor) -> torch.autocast:
    """Autocast off inside the op: it chooses every dtype itself (see ``layout``)."""
    return torch.autocast(x.device.type, enabled=False)


def fake_outputs(x: Tensor, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    steps, batch = x.shape[0], x.shape[1]
    return x.new_empty(steps, batch, h0.shape[1]), torch.empty_like(h0), torch.empty_like(c0)


@nested_lstm_op.register_fake
def _(x, weights, h0, c0, batch_sizes, reverse, activations, backend, zoneout=None, norms=None):
    return fake_outputs(x, h0, c0)


@nested_lstm_train_op.register_fake
def _(x, weights, h0, c0, batch_sizes, reverse, activations, backend, zoneout=None, norms=None):
    steps, batch, hidden, depth = x.shape[0], x.shape[1], h0.shape[1], c0.shape[0]
    normed = norms is not None and any(n.numel() for n in norms)
    shapes = saved_shapes(steps, batch, hidden, depth, x.dtype, x.device, normed)
    saved = [x.new_empty(shape, dtype=dtype) for shape, dtype in shapes.values()]
    return *fake_outputs(x, h0, c0), *saved


@nested_lstm_backward_op.register_fake
def _(
    x,
    weights,
    h0,
    out,
    gates,
    cells,
    act_cells,
    inputs,
    norm_gates,
    norm_cells,
    inv_std,
    batch_sizes,
    reverse,
    activations,
    backend,
    d_out,
    d_hn,
    d_cn,
    needs,
    zoneout=None,
    norms=None,
):
    def like(t: Tensor, need: bool) -> Tensor:
        return torch.empty_like(t) if need and t.numel() else x.new_empty(0)

    return (
        like(x, needs[0]),
        like(h0, needs[1]),
        x.new_empty(cells.shape[0], h0.shape[0], h0.shape[1]) if needs[2] else x.new_empty(0),
        [like(w, need) for w, need in zip(weights, needs[3:])],
        [like(n, need) for n, need in zip(norms or [], needs[3 + len(weights) :])],
    )


# ------------------------------------------------------------------------------- autograd


def _save(ctx, inputs, tensors: list[Tensor]) -> None:
    x, weights, h0, _, batch_sizes, reverse, activations, backend, *optional = inputs
    zoneout, norms = [*optional, None, None][:2]  # optional, and each may be None
    # outputs nobody used get None, not zeros: the saved tensors would be gigabytes of them
    ctx.set_materialize_grads(False)
    packed = [] if batch_sizes is None else [batch_sizes]
    zoned = [] if zoneout is None else [zoneout]
    normed = [] if norms is None else list(norms)
    ctx.save_for_backward(x, h0, *weights, *packed, *zoned, *normed, *tensors)
    ctx.n_weights, ctx.packed, ctx.zoned = len(weights), batch_sizes is not None, bool(zoned)
    ctx.n_norms = None if norms is None else len(normed)
    ctx.reverse, ctx.activations, ctx.backend = reverse, activations, backend


def _restore(ctx) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None, list[Tensor]]:
    """x, h0, the weights, batch_sizes, then the rest (the zoneout weights in ``ctx.zoneout``,
    the norms in ``ctx.norms``)."""
    x, h0, *rest = ctx.saved_tensors
    weights, rest = rest[: ctx.n_weights], rest[ctx.n_weights :]
    batch_sizes = rest.pop(0) if ctx.packed else None
    ctx.zoneout = rest.pop(0) if ctx.zoned else None
    ctx.norms = None
    if ctx.n_norms is not None:
        ctx.norms, rest = rest[: ctx.n_norms], rest[ctx.n_norms :]
    return x, h0, weights, batch_sizes, rest


def _gradients(ctx, x, h0, weights, batch_sizes, out, saved, grads, needs):
    """Call the backward op; map its empty placeholders back to None. ``needs``: x, h0, c0,
    then one per weight, then one per norm (the backward op's order). Returns dx, the weights'
    gradients, dh0, dc0, the norms' gradients (None without norms)."""
    d_out, d_hn, d_cn = grads
    depth, batch, hidden = saved[1].shape[0], h0.shape[0], h0.shape[1]
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_hn = torch.zeros_like(h0) if d_hn is None else d_hn
    d_cn = h0.new_zeros(depth, batch, hidden) if d_cn is None else d_cn
    dx, dh0, dc0, d_weights, d_norms = torch.ops.nestrnn.nested_lstm_backward(
        x,
        weights,
        h0,
        out,
        *saved,
        batch_sizes,
        ctx.reverse,
        ctx.activations,
        ctx.backend,
        d_out,
        d_hn,
        d_cn,
        needs,
        ctx.zoneout,
        ctx.norms,
    )
    needs_x, needs_h0, needs_c0, *needs_rest = needs
    needs_w, needs_n = needs_rest[: len(weights)], needs_rest[len(weights) :]
    d_weights = [
        g if need and w.numel() else None for g, w, need in zip(d_weights, weights, needs_w)
    ]
    norm_grads = None
    if ctx.norms is not None:
        norm_grads = [
            g if need and n.numel() else None for g, n, need in zip(d_norms, ctx.norms, needs_n)
        ]
    return (
        (dx if needs_x else None),
        d_weights,
        (dh0 if needs_h0 else None),
        (dc0 if needs_c0 else None),
        norm_grads,
    )


def _op_gradients(ctx, x, h0, weights, batch_sizes, out, saved, grads):
    """The gradients of the op's arguments: x, weights, h0, c0, then None for the others."""
    dx, dw, dh0, dc0, dn = _gradients(
        ctx, x, h0, weights, batch_sizes, out, saved, grads, _needs(ctx)
    )
    return dx, dw, dh0, dc0, *_no_gradients(ctx, dn)


def _needs(ctx) -> list[bool]:
    """x, h0, c0, then one per weight, then one per norm: the backward op's order."""
    needs = ctx.needs_input_grad  # x, weights (a list), h0, c0, ..., zoneout, norms (a list)
    norm_needs = list(needs[9]) if ctx.norms is not None else []
    return [needs[0], needs[2], needs[3], *needs[1], *norm_needs]


def _differentiable_gradients(ctx, x, h0, c0, weights, batch_sizes, grads, needs):
    """The gradients of x, the weights, h0 and c0 (None where ``needs`` says no) as a graph that
    can be differentiated again: for a backward with ``create_graph=True`` (gradient penalties,
    Hessian-vector products). The reference (``naive.py``) computes the op's function; its
    autograd graph, built here from the op's own inputs, gives the exact first derivative and
    every higher one. ``needs``: x, h0, c0, then one per weight, then one per norm."""
    levels = levels_of(weights)
    norms = list(ctx.norms) if ctx.norms is not None else []
    with torch.enable_grad():
        results = nested_lstm_naive(
            x,
            levels,
            h0,
            c0,
            batch_sizes,
            ctx.reverse,
            decode_activations(ctx.activations),
            zoneout=ctx.zoneout,
            norms=norms_of(ctx.norms),
        )
    wanted = [
        (n, t)
        for n, (t, need) in enumerate(zip([x, h0, c0, *weights, *norms], needs))
        if need and t.numel()
    ]
    pairs = [(r, g) for r, g in zip(results, grads) if g is not None and r.requires_grad]
    found = (
        torch.autograd.grad(
            [r for r, _ in pairs],
            [t for _, t in wanted],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        if pairs and wanted
        else [torch.zeros_like(t) for _, t in wanted]
    )
    full: list[Tensor | None] = [None] * len(needs)
    for (n, _), grad in zip(wanted, found):
        full[n] = grad
    dx, dh0, dc0, *rest = full
    d_weights, d_norms = rest[: len(weights)], rest[len(weights) :]
    return dx, d_weights, dh0, dc0, (d_norms if ctx.norms is not None else None)


def _through_reference(grads) -> bool:
    """Whether a backward must go through the reference (``_differentiable_gradients``) rather
    than the backward operator: with ``create_graph=True`` its gradients must be differentiable,
    and with ``torch.autograd.grad(..., is_grads_batched=True)`` the gradients arrive batched by
    autograd's own vmap (``torch._vmap_internals``), which has no batching rules of its own for
    custom operators and cannot loop over one that takes a list of tensors (the weights); the
    reference's plain PyTorch operations have its batching rules."""
    return torch.is_grad_enabled() or any(
        g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads
    )


def _setup_train(ctx, inputs, output) -> None:
    out, _, _, *saved = output
    ctx.mark_non_differentiable(*saved)
    _save(ctx, inputs, [inputs[3], out, *saved])  # c0, for a backward that records its graph


def _backward_train(ctx, d_out, d_hn, d_cn, *_saved_grads):
    x, h0, weights, batch_sizes, (c0, out, *saved) = _restore(ctx)
    if _through_reference((d_out, d_hn, d_cn)):
        return _recorded_op_gradients(ctx, x, h0, c0, weights, batch_sizes, (d_out, d_hn, d_cn))
    return _op_gradients(ctx, x, h0, weights, batch_sizes, out, saved, (d_out, d_hn, d_cn))


def _recorded_op_gradients(ctx, x, h0, c0, weights, batch_sizes, grads):
    """As ``_op_gradients``, through ``_differentiable_gradients``."""
    dx, dw, dh0, dc0, dn = _differentiable_gradients(
        ctx, x, h0, c0, weights, batch_sizes, grads, _needs(ctx)
    )
    return dx, dw, dh0, dc0, *_no_gradients(ctx, dn)


def _no_gradients(ctx, d_norms: list | None) -> list:
    """The gradients of every argument after c0: None for batch_sizes, the flags and zoneout (no
    gradient) where it was given, then the norms' where they were. An optional argument of None
    at the end is its default, which the dispatcher drops from the arguments whose structure the
    gradients must have (setup_context sees it filled in again)."""
    if ctx.norms is not None:
        return [None] * 5 + [d_norms]
    return [None] * (4 + ctx.zoned)


def _setup_inference(ctx, inputs, output) -> None:
    _save(ctx, inputs, [inputs[3]])  # c0: the backward recomputes the forward


def _backward_inference(ctx, d_out, d_hn, d_cn):
    x, h0, weights, batch_sizes, (c0,) = _restore(ctx)
    if _through_reference((d_out, d_hn, d_cn)):
        return _recorded_op_gradients(ctx, x, h0, c0, weights, batch_sizes, (d_out, d_hn, d_cn))
    out, _, _, *saved = torch.ops.nestrnn.nested_lstm_train(
        x,
        weights,
        h0,
        c0,
        batch_sizes,
        ctx.reverse,
        ctx.activations,
        ctx.backend,
        ctx.zoneout,
        ctx.norms,
    )
    return _op_gradients(ctx, x, h0, weights, batch_sizes, out, saved, (d_out, d_hn, d_cn))


nested_lstm_train_op.register_autograd(_backward_train, setup_context=_setup_train)
nested_lstm_op.register_autograd(_backward_inference, setup_context=_setup_inference)


# ------------------------------------------------------------------------------- vmap


def _vmap_loop(op, info, in_dims, *args):
    """The op once per index of the vmapped dimension, results stacked along dimension 0: exact
    whatever is vmapped (the weights of stacked models, a packed batch's sizes)."""

    def pick(arg, dim, n):
        if isinstance(arg, (list, tuple)):
            return [pick(a, d, n) for a, d in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, n)

    runs = [op(*(pick(a, d, n) for a, d in zip(args, in_dims))) for n in range(info.batch_size)]
    leaves, specs = zip(*(tree_flatten(run) for run in runs))
    stacked = [torch.stack(column) for column in zip(*leaves)]
    return tree_unflatten(stacked, specs[0]), tree_unflatten([0] * len(stacked), specs[0])


def _forward_vmap(op):
    """A batching rule for a forward operator. The rows of a batch are independent, so where only
    x and the state are vmapped (not the weights, and no packed batch, whose rows are sorted by
    length) the vmapped dimension joins the batch: one call on V * B rows instead of V calls."""

    def rule(
        info, in_dims, x, weights, h0, c0, batch_sizes, reverse, activations, backend, *optional
    ):
        args = (x, weights, h0, c0, batch_sizes, reverse, activations, backend, *optional)
        x_dim, w_dims, h_dim, c_dim = in_dims[:4]
        zoneout, norms = [*optional, None, None][:2]
        zoned = zoneout is not None  # its rows could join too; not worth it yet
        n_dims = in_dims[9] if norms is not None else []
        weights_mapped = any(d is not None for d in [*w_dims, *n_dims])
        if batch_sizes is not None or zoned or weights_mapped:
            return _vmap_loop(op, info, in_dims, *args)
        v = info.batch_size

        def leading(t: Tensor, dim: int | None) -> Tensor:
            return t.expand(v, *t.shape) if dim is None else t.movedim(dim, 0)

        x, h0, c0 = leading(x, x_dim), leading(h0, h_dim), leading(c0, c_dim)
        (steps, batch, _), (depth, _, hidden) = x.shape[1:], c0.shape[1:]
        x = x.transpose(0, 1).reshape(steps, v * batch, -1)
        h0 = h0.reshape(v * batch, -1)
        c0 = c0.transpose(0, 1).reshape(depth, v * batch, hidden)
        out, h_n, c_n, *saved = op(
            x, weights, h0, c0, None, reverse, activations, backend, None, norms
        )
        results = (
            out.unflatten(1, (v, batch)),
            h_n.unflatten(0, (v, batch)),
            c_n.unflatten(1, (v, batch)),
            *(t.unflatten(2, (v, batch)) for t in saved),  # (D, T, B, .): layout.Saved
        )
        return results, (1, 0, 1, *(2 for _ in saved))

    return rule


def _backward_vmap(info, in_dims, *args):
    """The backward operator's batching rule: a loop (its weight gradients are sums over the
    batch, so the vmapped dimension cannot join it)."""
    return _vmap_loop(torch.ops.nestrnn.nested_lstm_backward, info, in_dims, *args)


torch.library.register_vmap(nested_lstm_op, _forward_vmap(torch.ops.nestrnn.nested_lstm))
torch.library.register_vmap(
    nested_lstm_train_op, _forward_vmap(torch.ops.nestrnn.nested_lstm_train)
)
torch.library.register_vmap(nested_lstm_backward_op, _backward_vmap)
