"""Layer normalisation inside the Triton kernels: ``triton_loop.forward`` / ``backward`` with
``norms=`` against a reference under autograd written from the formula (docs/design.md):

    z = W_ih x + b_ih + W_hh h + b_hh; each gate block of z layer-normalised (gamma_gates,
    beta_gates) before its activation; c_k_new as without LN (carried unnormalised); the level's
    output o_k * act_k(LN(c_k_new)) (gamma_cell, beta_cell); biased variance, eps 1e-5.

Like ``test_zoneout_triton.py`` this runs the kernels under Triton's interpreter on CPU tensors
(float32), or on CUDA with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip(
    "triton", reason="triton is not installed (optional dependency nestrnn[triton])"
)

from nestrnn.ops.common.gradients import parameter_gradients
from nestrnn.ops.common.levels import LevelWeights, standard_activations, time_order
from nestrnn.ops.nested_lstm import triton_loop
from nestrnn.ops.nested_lstm.triton_configs import TritonConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = 1e-4  # float32; LN divides by a row's std
PACKED = torch.tensor([3, 3, 2, 1, 1])  # T = 5, B = 3
T, B, IN, H = 5, 3, 4, 8
NAMES = ("output", "h_n", "c_n", "grad x", "grad h0", "grad c0")
NORM_NAMES = ("gamma_gates", "beta_gates", "gamma_cell", "beta_cell")
ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda v: v}


def make_case(depth: int, normed: tuple[bool, ...], seed: int = 0):
    """fp64 leaves x, D LevelWeights, h0, c0, the LN parameters of the levels in ``normed``
    (random, so that their gradients are all tested) and the gradients of the three outputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    weights = [
        LevelWeights(
            rnd(4 * H, IN if k == 0 else H) * 0.5, rnd(4 * H, H) * 0.5, rnd(4 * H) * 0.5, None
        )
        for k in range(depth)
    ]
    norms = [
        (1 + 0.3 * rnd(4 * H), 0.3 * rnd(4 * H), 1 + 0.3 * rnd(H), 0.3 * rnd(H)) if on else None
        for on in normed
    ]
    leaves = (rnd(T, B, IN), weights, norms, rnd(B, H), rnd(depth, B, H))
    return leaves, (rnd(T, B, H), rnd(B, H), rnd(depth, B, H))


def layer_norm(v, gamma, beta):
    return F.layer_norm(v, (v.shape[-1],), gamma, beta, eps=1e-5)


def step(x_t, h, cells, weights, norms, activations):
    """One step of the nested cell with LN where ``norms`` has parameters: h and the new cells."""
    new_cells = list(cells)

    def level(k, x_in, h_in):  # level k's output; its new cell into new_cells[k]
        w, norm, acts = weights[k], norms[k], activations[k]
        z = F.linear(x_in, w.weight_ih, w.bias_ih) + F.linear(h_in, w.weight_hh, w.bias_hh)
        if norm is not None:
            blocks = zip(z.chunk(4, 1), norm[0].chunk(4), norm[1].chunk(4))
            z = torch.cat([layer_norm(zj, gj, bj) for zj, gj, bj in blocks], 1)
        i, f, g, o = z.chunk(4, 1)
        i, f, o = (ACT[acts.gate](v) for v in (i, f, o))
        g = ACT[acts.candidate](g)
        innermost = k == len(weights) - 1  # additive; else level k + 1 is the cell update
        c = f * cells[k] + i * g if innermost else level(k + 1, i * g, f * cells[k])
        new_cells[k] = c
        return o * ACT[acts.cell](c if norm is None else layer_norm(c, norm[2], norm[3]))

    return level(0, x_t, h), new_cells


def reference(x, weights, norms, h0, c0, batch_sizes, reverse, zoneout):
    """The op with LN (and zoneout, ``keep * previous + (1 - keep) * new`` per carried state);
    inactive rows of a packed batch carry their state."""
    depth, activations = len(weights), standard_activations(len(weights))
    h, cells = h0, list(c0.unbind(0))
    outputs = [torch.zeros_like(h0)] * x.shape[0]
    for t in time_order(x.shape[0], reverse):
        h_new, cells_new = step(x[t], h, cells, weights, norms, activations)
        if zoneout is not None:
            keep = zoneout[:, t].to(h.dtype)
            h_new = keep[depth] * h + (1 - keep[depth]) * h_new
            cells_new = [
                keep[k] * c + (1 - keep[k]) * n for k, (c, n) in enumerate(zip(cells, cells_new))
            ]
        active = torch.ones(x.shape[1], 1, dtype=torch.bool)
        if batch_sizes is not None:
            active = (torch.arange(x.shape[1]) < int(batch_sizes[t]))[:, None]
        h = torch.where(active, h_new, h)
        cells = [torch.where(active, new, old) for new, old in zip(cells_new, cells)]
        outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, torch.stack(cells)


def reference_results(case, batch_sizes, reverse, zoneout) -> dict[str, torch.Tensor]:
    (x, weights, norms, h0, c0), grads = case
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.clone().requires_grad_() for p in lw])
        for lw in weights
    ]
    norms = [None if n is None else [p.clone().requires_grad_() for p in n] for n in norms]
    out = reference(x, weights, norms, h0, c0, batch_sizes, reverse, zoneout)
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    results = {name: o.detach() for name, o in zip(NAMES, out)}
    results.update({"grad x": x.grad, "grad h0": h0.grad, "grad c0": c0.grad})
    for k, lw in enumerate(weights):
        results.update(
            {f"level {k} dW_ih": lw.weight_ih.grad, f"level {k} dW_hh": lw.weight_hh.grad}
        )
        results[f"level {k} db"] = lw.bias_ih.grad
        for name, p in zip(NORM_NAMES, norms[k] or ()):
            results[f"level {k} d{name}"] = p.grad
    return results


def triton_results(case, batch_sizes, reverse, zoneout) -> dict[str, torch.Tensor]:
    """``triton_loop.forward`` then ``backward`` in float32 on DEVICE, the weights' gradients by
    the op's own GEMMs; every result in fp64 on CPU."""
    (x, weights, norms, h0, c0), grads = case
    x, h0, c0 = (t.float().to(DEVICE) for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.float().to(DEVICE) for p in lw]) for lw in weights
    ]
    norms = [None if n is None else tuple(p.float().to(DEVICE) for p in n) for n in norms]
    d_out, d_hn, d_cn = (g.float().to(DEVICE) for g in grads)
    kw = {"norms": norms} if zoneout is None else {"norms": norms, "zoneout": zoneout.to(DEVICE)}
    acts = standard_activations(len(weights))
    out, h_n, c_n, saved = triton_loop.forward(
        x, weights, h0, c0, batch_sizes, reverse, acts, True, **kw
    )
    assert saved.normalised()
    dz, dh0, dc0, norm_grads = triton_loop.backward(
        saved, weights, batch_sizes, reverse, acts, d_out, d_hn, d_cn, **kw
    )
    needs = [(True, True, True)] * len(weights)
    dx, level_grads = parameter_gradients(
        x, h0, out, weights, saved.inputs, dz, batch_sizes, reverse, True, needs
    )
    results = dict(zip(NAMES, (out, h_n, c_n, dx, dh0, dc0)))
    for k, (dw_ih, dw_hh, db) in enumerate(level_grads):
        results.update({f"level {k} dW_ih": dw_ih, f"level {k} dW_hh": dw_hh, f"level {k} db": db})
        assert (norm_grads[k] is None) == (norms[k] is None)
        for name, grad in zip(NORM_NAMES, norm_grads[k] or ()):
            results[f"level {k} d{name}"] = grad
    return {name: t.double().cpu() for name, t in results.items()}


def errors(got: dict, want: dict) -> list[str]:
    assert got.keys() == want.keys()
    bad = []
    for name, w in want.items():
        err = (got[name] - w).abs().max().item() / max(1.0, w.abs().max().item())
        if not err <= TOL:
            bad.append(f"{name}: scaled max error {err:.2e}")
    return bad


#: the per-step GEMMs by cuBLAS (torch.mm on CPU) and, under the interpreter, two batch tiles
CUBLAS = TritonConfig(cublas_gemms=True)
if INTERPRET:
    CUBLAS = TritonConfig(block_b=2, block_k=16, cublas_gemms=True)


@pytest.mark.parametrize(
    ("normed", "batch_sizes", "reverse", "zoneout", "config"),
    [
        ((True,), None, False, False, None),
        ((True, True), PACKED, False, False, None),
        ((False, True), PACKED, True, True, CUBLAS),
    ],
    ids=["depth 1", "depth 2 packed", "depth 2 inner LN only, packed reverse zoneout cublas"],
)
def test_layer_norm_matches_the_formula(normed, batch_sizes, reverse, zoneout, config, monkeypatch):
    if config is not None:
        choose = triton_loop.pick_config
        monkeypatch.setattr(
            triton_loop,
            "pick_config",
            lambda batch, hidden, _=None, dtype=torch.float32, graphed=False: choose(
                batch, hidden, config, dtype, graphed
            ),
        )
    depth = len(normed)
    case = make_case(depth, normed)
    keep = None
    if zoneout:
        g = torch.Generator().manual_seed(1)
        keep = torch.bernoulli(torch.full((depth + 1, T, B, H), 0.5), generator=g)
    want = reference_results(case, batch_sizes, reverse, keep)
    got = triton_results(case, batch_sizes, reverse, keep)
    assert not errors(got, want)


def test_gpu_configuration_holds_whole_rows(monkeypatch):
    """On a GPU a call with LN gets one program along H, cuBLAS's GEMMs (no tl.dot tile of a
    whole row) and a tile of at most WHOLE_ROW_TILE elements."""
    from nestrnn.ops.nested_lstm import triton_configs

    monkeypatch.delenv("TRITON_INTERPRET")
    for batch, hidden in ((32, 200), (128, 1024), (3, 17)):
        cfg = triton_configs.whole_rows(triton_configs.pick_config(batch, hidden), hidden)
        assert cfg.block_h >= hidden and cfg.cublas_gemms
        assert cfg.block_b * cfg.block_h <= max(triton_configs.WHOLE_ROW_TILE, 2 * cfg.block_h)


def test_misshapen_parameters_are_refused():
    (x, weights, norms, h0, c0), _ = make_case(1, (True,))
    gamma_gates, beta_gates, gamma_cell, beta_cell = (p.float() for p in norms[0])
    weights = [LevelWeights(*[None if p is None else p.float() for p in lw]) for lw in weights]
    swapped = [(gamma_cell, beta_gates, gamma_gates, beta_cell)]  # 10H elements all the same
    with pytest.raises(ValueError, match="level 0's LN parameters"):
        triton_loop.forward(
            x.float(),
            weights,
            h0.float(),
            c0.float(),
            None,
            False,
            standard_activations(1),
            True,
            norms=swapped,
        )


# --------------------------------------------------------------- through the op and the layer


@pytest.mark.parametrize(
    "normed, zoneout, packed, reverse",
    [((True,), False, False, False), ((True, False, True), True, True, True)],
    ids=["depth1", "depth3-mixed-zoneout-packed-reversed"],
)
def test_the_op_on_triton_matches_the_reference(normed, zoneout, packed, reverse):
    """``nested_lstm(..., backend="triton", norms=...)``: the op's LN contract (``Saved``'s
    normalisation fields, the norms' gradients from the backward) against ``nested_lstm_naive``
    for every output and every gradient, the LN parameters' included."""
    from nestrnn.ops.common.levels import LevelNorms
    from nestrnn.ops.nested_lstm import nested_lstm, nested_lstm_naive, plan

    (x, weights, norms, h0, c0), _ = make_case(len(normed), normed)
    leaves = [x.float(), h0.float(), c0.float()]
    leaves += [None if p is None else p.float() for lw in weights for p in lw]
    leaves += [p.float() for n in norms if n is not None for p in n]
    batch_sizes = PACKED if packed else None
    keep = None
    if zoneout:
        g = torch.Generator().manual_seed(1)
        keep = torch.bernoulli(torch.full((len(normed) + 1, T, B, H), 0.5), generator=g)
    acts = standard_activations(len(normed))
    chosen = plan(leaves[0], batch_sizes, reverse, acts, True, "triton", norms=True)
    assert chosen.implementation == "triton", chosen

    def run(fn, **backend):
        tensors = [None if t is None else t.detach().to(DEVICE).requires_grad_() for t in leaves]
        x_, h0_, c0_ = tensors[:3]
        ws = [LevelWeights(*tensors[3 + 4 * k : 7 + 4 * k]) for k in range(len(normed))]
        rest = iter(tensors[3 + 4 * len(normed) :])
        ns = [LevelNorms(*(next(rest) for _ in range(4))) if on else None for on in normed]
        z = None if keep is None else keep.to(DEVICE)
        outs = fn(x_, ws, h0_, c0_, batch_sizes, reverse, zoneout=z, norms=ns, **backend)
        g = torch.Generator().manual_seed(2)
        loss = sum((o * torch.randn(o.shape, generator=g).to(DEVICE)).sum() for o in outs)
        grads = torch.autograd.grad(loss, [t for t in tensors if t is not None])
        return [*outs, *grads]

    got = run(nested_lstm, backend="triton")
    want = run(nested_lstm_naive)
    assert len(got) == len(want)
    for n, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=f"result {n}")
    assert_triton_ran()


def assert_triton_ran() -> None:
    """No launch failed (a failure would have run the fallback instead, with a warning)."""
    from nestrnn.ops.nested_lstm import planning

    assert "triton" not in planning.failures(), planning.failures()


def test_the_layer_on_triton_matches_the_reference_given_the_same_masks() -> None:
    """NestedLSTM(backend="triton", layer_norm=...) with zoneout and weight drop against backend
    "naive", both drawing their masks from one seed: the path users take."""
    from nestrnn import NestedLSTM

    options = {"layer_norm": [True, False], "zoneout_cell": 0.3, "weight_drop": 0.2}
    torch.manual_seed(0)
    fast = NestedLSTM(IN, H, depth=2, backend="triton", **options).to(DEVICE)
    ref = NestedLSTM(IN, H, depth=2, backend="naive", **options).to(DEVICE)
    with torch.no_grad():  # away from the identity init, so that every LN parameter matters
        for name, p in fast.named_parameters():
            if "layer_norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(T, B, IN, device=DEVICE)
    results = []
    for model in (fast, ref):
        torch.manual_seed(3)
        xi = x.clone().requires_grad_()
        out, (h, c) = model(xi)
        (out.sum() + h.pow(2).sum() + c.sin().sum()).backward()
        results.append([out, h, c, xi.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert_triton_ran()
