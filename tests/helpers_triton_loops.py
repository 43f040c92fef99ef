"""What the tests of zoneout and layer normalisation inside the Triton loops share: one reference
written from the formulas (docs/design.md), the Triton loops run on the same case, and the
comparison. Like ``test_op_triton.py`` they run the kernels under Triton's interpreter on CPU
tensors (float32), or on CUDA with ``TRITON_INTERPRET=0``. Import this before Triton.

The reference, per level k (the outer level 0 reads x and h; level k + 1 reads ``i_k * g_k`` and
``f_k * c_k``; the innermost adds, ``c = f * c_prev + i * g``):

    z = W_ih x + b_ih + W_hh h + b_hh; with LN each gate block of z layer-normalised (gamma_gates,
    beta_gates; biased variance, eps 1e-5) before its activation; the level's output
    o * act(c_new), with LN o * act(LN(c_new)) (gamma_cell, beta_cell), the carried cell
    unnormalised; with zoneout each carried state (the D cells, then h) is
    ``keep * previous + (1 - keep) * new``; rows inactive at a step of a packed batch carry their
    state and output zero.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from nestrnn.ops.common.gradients import parameter_gradients
from nestrnn.ops.common.levels import LevelWeights, standard_activations, time_order

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
PACKED = torch.tensor([3, 3, 2, 1, 1])  # T = 5, B = 3
T, B, IN, H = 5, 3, 4, 8
NAMES = ("output", "h_n", "c_n", "grad x", "grad h0", "grad c0")
NORM_NAMES = ("gamma_gates", "beta_gates", "gamma_cell", "beta_cell")
ACT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda v: v}


def skip_without_a_device() -> None:
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)


def make_case(depth: int, normed: tuple[bool, ...] = (), seed: int = 0):
    """fp64 leaves (x, D LevelWeights, D norms, h0, c0) and the gradients of the three outputs.
    ``normed``: the levels with LN (random parameters, so that their gradients all count); the
    norms of the others are None."""
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
        for on in (normed or (False,) * depth)
    ]
    leaves = (rnd(T, B, IN), weights, norms, rnd(B, H), rnd(depth, B, H))
    return leaves, (rnd(T, B, H), rnd(B, H), rnd(depth, B, H))


def masks(depth: int, seed: int = 1) -> torch.Tensor:
    """Training's keep weights: fresh 0/1 draws per state, step, row and unit."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((depth + 1, T, B, H), 0.5), generator=g)


def _layer_norm(v, gamma, beta):
    return F.layer_norm(v, (v.shape[-1],), gamma, beta, eps=1e-5)


def _step(x_t, h, cells, weights, norms, activations):
    """One step of the nested cell (see the module docstring): h and the new cells."""
    new_cells = list(cells)

    def level(k, x_in, h_in):  # level k's output; its new cell into new_cells[k]
        w, norm, acts = weights[k], norms[k], activations[k]
        z = F.linear(x_in, w.weight_ih, w.bias_ih) + F.linear(h_in, w.weight_hh, w.bias_hh)
        if norm is not None:
            blocks = zip(z.chunk(4, 1), norm[0].chunk(4), norm[1].chunk(4))
            z = torch.cat([_layer_norm(zj, gj, bj) for zj, gj, bj in blocks], 1)
        i, f, g, o = z.chunk(4, 1)
        i, f, o = (ACT[acts.gate](v) for v in (i, f, o))
        g = ACT[acts.candidate](g)
        innermost = k == len(weights) - 1  # additive; else level k + 1 is the cell update
        c = f * cells[k] + i * g if innermost else level(k + 1, i * g, f * cells[k])
        new_cells[k] = c
        return o * ACT[acts.cell](c if norm is None else _layer_norm(c, norm[2], norm[3]))

    return level(0, x_t, h), new_cells


def reference(x, weights, norms, h0, c0, batch_sizes, reverse, zoneout):
    """The whole sequence by the module docstring's formulas: output, h_n, c_n."""
    depth, activations = len(weights), standard_activations(len(weights))
    h, cells = h0, list(c0.unbind(0))
    outputs = [torch.zeros_like(h0)] * x.shape[0]
    for t in time_order(x.shape[0], reverse):
        h_new, cells_new = _step(x[t], h, cells, weights, norms, activations)
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
    """The reference's outputs and every gradient under autograd, fp64."""
    (x, weights, norms, h0, c0), grads = case
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.clone().requires_grad_() for p in lw])
        for lw in weights
    ]
    norms = [None if n is None else [p.clone().requires_grad_() for p in n] for n in norms]
    keep = None if zoneout is None else zoneout.double()
    out = reference(x, weights, norms, h0, c0, batch_sizes, reverse, keep)
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
    the op's own GEMMs; every result in fp64 on CPU. ``norms=`` and ``zoneout=`` are passed only
    where the case has them, so a case without runs the loops exactly as a call without."""
    from nestrnn.ops.nested_lstm import triton_loop

    (x, weights, norms, h0, c0), grads = case
    x, h0, c0 = (t.float().to(DEVICE) for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.float().to(DEVICE) for p in lw]) for lw in weights
    ]
    normed = any(n is not None for n in norms)
    kw = {}
    if normed:
        kw["norms"] = [None if n is None else tuple(p.float().to(DEVICE) for p in n) for n in norms]
    if zoneout is not None:
        kw["zoneout"] = zoneout.to(DEVICE)
    d_out, d_hn, d_cn = (g.float().to(DEVICE) for g in grads)
    acts = standard_activations(len(weights))
    out, h_n, c_n, saved = triton_loop.forward(
        x, weights, h0, c0, batch_sizes, reverse, acts, True, **kw
    )
    assert saved is not None and saved.normalised() == normed
    dz, dh0, dc0, *rest = triton_loop.backward(
        saved, weights, batch_sizes, reverse, acts, d_out, d_hn, d_cn, **kw
    )
    norm_grads = rest[0] if normed else [None] * len(weights)
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


def errors(got: dict, want: dict, tol: float) -> list[str]:
    """The results whose max error, scaled by max(1, the reference's max), exceeds ``tol``."""
    assert got.keys() == want.keys()
    bad = []
    for name, w in want.items():
        err = (got[name] - w).abs().max().item() / max(1.0, w.abs().max().item())
        if not err <= tol:
            bad.append(f"{name}: scaled max error {err:.2e}")
    return bad


def pin_config(monkeypatch, config) -> None:
    """Make ``triton_loop.pick_config`` return ``config`` (None: leave it)."""
    if config is None:
        return
    from nestrnn.ops.nested_lstm import triton_loop

    choose = triton_loop.pick_config
    monkeypatch.setattr(
        triton_loop,
        "pick_config",
        lambda batch, hidden, _=None, dtype=torch.float32, graphed=False: choose(
            batch, hidden, config, dtype, graphed
        ),
    )


def cublas_config():
    """The per-step GEMMs by cuBLAS (torch.mm on CPU) and, under the interpreter, two batch tiles
    (a call with LN widens ``block_h`` to whole rows)."""
    from nestrnn.ops.nested_lstm.triton_configs import TritonConfig

    if INTERPRET:
        return TritonConfig(block_b=2, block_h=16, block_k=16, cublas_gemms=True)
    return TritonConfig(cublas_gemms=True)


def assert_layer_matches_naive(options: dict, tol: float, away_from_init: bool = False) -> None:
    """NestedLSTM(IN, H, depth=2, backend="triton", **options) against backend "naive", both
    drawing their masks from one seed: outputs, state, every gradient; and no launch failed (a
    failure would have run the fallback, with a warning). ``away_from_init``: move the
    layer-norm parameters off their identity init first, so that each of them matters."""
    from nestrnn import NestedLSTM
    from nestrnn.ops.nested_lstm import planning

    torch.manual_seed(0)
    fast = NestedLSTM(IN, H, depth=2, backend="triton", **options).to(DEVICE)
    ref = NestedLSTM(IN, H, depth=2, backend="naive", **options).to(DEVICE)
    if away_from_init:
        with torch.no_grad():
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
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert "triton" not in planning.failures(), planning.failures()
