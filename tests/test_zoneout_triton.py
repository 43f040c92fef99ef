"""Zoneout inside the Triton kernels: ``triton_loop.forward`` / ``backward`` with keep weights
against a reference under autograd written from the formula of the op's ``zoneout`` argument.

At step t the cell is computed as without zoneout from the carried state; what is carried (and
output) is ``keep * previous + (1 - keep) * new`` per state (the D cells, then h). Like
``test_op_triton.py`` this runs the kernels under Triton's interpreter on CPU tensors (float32,
its tolerance), or on CUDA with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip(
    "triton", reason="triton is not installed (optional dependency nestrnn[triton])"
)

from nestrnn.ops.common.gradients import parameter_gradients
from nestrnn.ops.common.levels import LevelWeights, standard_activations, time_order
from nestrnn.ops.common.reference import nested_cell_step
from nestrnn.ops.nested_lstm import triton_loop
from nestrnn.ops.nested_lstm.triton_configs import TritonConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = 2e-5  # float32, as test_op_triton.py
PACKED = torch.tensor([3, 3, 2, 1, 1])  # T = 5, B = 3
T, B, IN, H = 5, 3, 4, 8
NAMES = ("output", "h_n", "c_n", "grad x", "grad h0", "grad c0")


def make_case(depth: int, seed: int = 0):
    """fp64 leaves x, D LevelWeights, h0, c0 and the gradients of the three outputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    weights = [
        LevelWeights(
            rnd(4 * H, IN if k == 0 else H) * 0.5, rnd(4 * H, H) * 0.5, rnd(4 * H) * 0.5, None
        )
        for k in range(depth)
    ]
    leaves = (rnd(T, B, IN), weights, rnd(B, H), rnd(depth, B, H))
    return leaves, (rnd(T, B, H), rnd(B, H), rnd(depth, B, H))


def masks(depth: int, seed: int = 1) -> torch.Tensor:
    """Training's keep weights: fresh 0/1 draws per state, step, row and unit."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((depth + 1, T, B, H), 0.5), generator=g)


def reference(x, weights, h0, c0, batch_sizes, reverse, zoneout):
    """The op with zoneout by its formula: the step from the carried state, then each carried
    state mixed with its previous value; inactive rows of a packed batch carry their state."""
    depth = len(weights)
    activations = standard_activations(depth)
    h, cells = h0, list(c0.unbind(0))
    outputs = [torch.zeros_like(h0)] * x.shape[0]
    for t in time_order(x.shape[0], reverse):
        h_new, cells_new = nested_cell_step(x[t], h, cells, weights, activations)
        keep = zoneout[:, t].to(h.dtype)
        h_new = keep[depth] * h + (1 - keep[depth]) * h_new
        cells_new = [
            keep[k] * c + (1 - keep[k]) * new for k, (c, new) in enumerate(zip(cells, cells_new))
        ]
        active = torch.ones(x.shape[1], 1, dtype=torch.bool)
        if batch_sizes is not None:
            active = (torch.arange(x.shape[1]) < int(batch_sizes[t]))[:, None]
        h = torch.where(active, h_new, h)
        cells = [torch.where(active, new, old) for new, old in zip(cells_new, cells)]
        outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, torch.stack(cells)


def reference_results(case, batch_sizes, reverse, zoneout) -> dict[str, torch.Tensor]:
    (x, weights, h0, c0), grads = case
    x, h0, c0 = (t.clone().requires_grad_() for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.clone().requires_grad_() for p in lw])
        for lw in weights
    ]
    out = reference(x, weights, h0, c0, batch_sizes, reverse, zoneout.double())
    sum((o * g).sum() for o, g in zip(out, grads)).backward()
    results = {name: o.detach() for name, o in zip(NAMES, out)}
    results.update({"grad x": x.grad, "grad h0": h0.grad, "grad c0": c0.grad})
    for k, lw in enumerate(weights):
        results.update(
            {f"level {k} dW_ih": lw.weight_ih.grad, f"level {k} dW_hh": lw.weight_hh.grad}
        )
        results[f"level {k} db"] = lw.bias_ih.grad
    return results


def triton_results(case, batch_sizes, reverse, zoneout) -> dict[str, torch.Tensor]:
    """``triton_loop.forward`` then ``backward`` in float32 on DEVICE, the parameter gradients
    by the op's own GEMMs; every result in fp64 on CPU."""
    (x, weights, h0, c0), grads = case
    x, h0, c0 = (t.float().to(DEVICE) for t in (x, h0, c0))
    weights = [
        LevelWeights(*[None if p is None else p.float().to(DEVICE) for p in lw]) for lw in weights
    ]
    d_out, d_hn, d_cn = (g.float().to(DEVICE) for g in grads)
    zoneout = None if zoneout is None else zoneout.to(DEVICE)
    acts = standard_activations(len(weights))
    out, h_n, c_n, saved = triton_loop.forward(
        x, weights, h0, c0, batch_sizes, reverse, acts, True, zoneout=zoneout
    )
    dz, dh0, dc0 = triton_loop.backward(
        saved, weights, batch_sizes, reverse, acts, d_out, d_hn, d_cn, zoneout=zoneout
    )
    needs = [(True, True, True)] * len(weights)
    dx, level_grads = parameter_gradients(
        x, h0, out, weights, saved.inputs, dz, batch_sizes, reverse, True, needs
    )
    results = dict(zip(NAMES, (out, h_n, c_n, dx, dh0, dc0)))
    for k, (dw_ih, dw_hh, db) in enumerate(level_grads):
        results.update({f"level {k} dW_ih": dw_ih, f"level {k} dW_hh": dw_hh, f"level {k} db": db})
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
    CUBLAS = TritonConfig(block_b=2, block_h=16, block_k=16, cublas_gemms=True)


@pytest.mark.parametrize(
    ("depth", "batch_sizes", "reverse", "config"),
    [
        (1, None, False, None),
        (2, PACKED, False, None),
        (2, None, True, None),
        (3, PACKED, True, CUBLAS),
    ],
    ids=["depth 1", "depth 2 packed", "depth 2 reverse", "depth 3 packed reverse cublas"],
)
def test_training_masks_match_the_formula(depth, batch_sizes, reverse, config, monkeypatch):
    if config is not None:
        choose = triton_loop.pick_config
        monkeypatch.setattr(
            triton_loop,
            "pick_config",
            lambda batch, hidden, _=None, dtype=torch.float32, graphed=False: choose(
                batch, hidden, config, dtype, graphed
            ),
        )
    case, zoneout = make_case(depth), masks(depth)
    want = reference_results(case, batch_sizes, reverse, zoneout)
    assert not errors(triton_results(case, batch_sizes, reverse, zoneout), want)


def test_evaluation_rate_expanded_with_stride_zero():
    """Evaluation passes the rate per state and unit expanded along T and B (strides 0), here in
    float64: the kernels read it through its strides, in their own dtype."""
    depth = 2
    rate = torch.tensor([0.1, 0.5, 0.3], dtype=torch.float64)[:, None] * torch.linspace(0, 1, H)
    zoneout = rate.view(depth + 1, 1, 1, H).expand(depth + 1, T, B, H)
    assert zoneout.stride()[:3] == (H, 0, 0)
    case = make_case(depth, seed=2)
    want = reference_results(case, PACKED, True, zoneout)
    assert not errors(triton_results(case, PACKED, True, zoneout), want)


def test_all_zero_masks_equal_no_zoneout():
    depth = 2
    case = make_case(depth, seed=3)
    plain = triton_results(case, PACKED, False, None)
    zero = triton_results(case, PACKED, False, torch.zeros(depth + 1, T, B, H))
    for name, want in plain.items():
        torch.testing.assert_close(zero[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_the_layer_on_triton_matches_the_reference_given_the_same_masks() -> None:
    """NestedLSTM(backend="triton") with weight drop and zoneout against backend "naive", both
    drawing their masks from one seed: the path users take, through the op."""
    from nestrnn import NestedLSTM

    options = {"weight_drop": 0.3, "zoneout_cell": [0.3, 0.5], "zoneout_hidden": 0.2}
    torch.manual_seed(0)
    fast = NestedLSTM(IN, H, depth=2, backend="triton", **options).to(DEVICE)
    ref = NestedLSTM(IN, H, depth=2, backend="naive", **options).to(DEVICE)
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
