"""Layer normalisation inside the Triton kernels: ``triton_loop.forward`` / ``backward`` with
``norms=`` against a reference under autograd written from the formula (docs/design.md):

    z = W_ih x + b_ih + W_hh h + b_hh; each gate block of z layer-normalised (gamma_gates,
    beta_gates) before its activation; c_k_new as without LN (carried unnormalised); the level's
    output o_k * act_k(LN(c_k_new)) (gamma_cell, beta_cell); biased variance, eps 1e-5.

The reference and the runs are ``helpers_triton_loops``'s (the interpreter on CPU, or CUDA with
``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import pytest
import torch
from helpers_triton_loops import (
    DEVICE,
    PACKED,
    assert_layer_matches_naive,
    cublas_config,
    errors,
    make_case,
    masks,
    pin_config,
    reference_results,
    skip_without_a_device,
    triton_results,
)

pytest.importorskip(
    "triton", reason="triton is not installed (optional dependency nestrnn[triton])"
)

from nestrnn.ops.common.levels import LevelNorms, LevelWeights, standard_activations
from nestrnn.ops.nested_lstm import nested_lstm, nested_lstm_naive, plan, planning, triton_loop

skip_without_a_device()
TOL = 1e-4  # float32; LN divides by a row's std


@pytest.mark.parametrize(
    ("normed", "batch_sizes", "reverse", "zoneout", "config"),
    [
        ((True,), None, False, False, None),
        ((True, True), PACKED, False, False, None),
        ((False, True), PACKED, True, True, "cublas"),
    ],
    ids=["depth 1", "depth 2 packed", "depth 2 inner LN only, packed reverse zoneout cublas"],
)
def test_layer_norm_matches_the_formula(normed, batch_sizes, reverse, zoneout, config, monkeypatch):
    pin_config(monkeypatch, config and cublas_config())
    depth = len(normed)
    case = make_case(depth, normed)
    keep = masks(depth) if zoneout else None
    want = reference_results(case, batch_sizes, reverse, keep)
    got = triton_results(case, batch_sizes, reverse, keep)
    assert not errors(got, want, TOL)


def test_gpu_configuration_holds_whole_rows(monkeypatch):
    """On a GPU a call with LN gets one row a program covering all H units, cuBLAS's GEMMs (no
    tl.dot tile of a whole row) and a warp per 64 units (4 to 16)."""
    from nestrnn.ops.nested_lstm import triton_configs

    monkeypatch.delenv("TRITON_INTERPRET")
    for batch, hidden, warps in ((32, 200, 4), (128, 1024, 16), (3, 17, 4), (64, 512, 8)):
        cfg = triton_configs.whole_rows(triton_configs.pick_config(batch, hidden), hidden)
        assert cfg.block_h >= hidden and cfg.cublas_gemms
        assert (cfg.block_b, cfg.num_warps) == (1, warps)


def test_one_row_a_program_matches_the_formula(monkeypatch):
    """The GPU's whole-row configuration (one row a program, GEMMs by cuBLAS) under the
    interpreter: LN at both levels with zoneout, packed and reversed."""
    from nestrnn.ops.nested_lstm.triton_configs import TritonConfig

    pin_config(monkeypatch, TritonConfig(block_b=1, block_h=16, block_k=16, cublas_gemms=True))
    case = make_case(2, (True, True), seed=4)
    want = reference_results(case, PACKED, True, masks(2))
    assert not errors(triton_results(case, PACKED, True, masks(2)), want, TOL)


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
    (x, weights, norms, h0, c0), _ = make_case(len(normed), normed)
    leaves = [x.float(), h0.float(), c0.float()]
    leaves += [None if p is None else p.float() for lw in weights for p in lw]
    leaves += [p.float() for n in norms if n is not None for p in n]
    batch_sizes = PACKED if packed else None
    keep = masks(len(normed)) if zoneout else None
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
    assert "triton" not in planning.failures(), planning.failures()  # no fallback ran


def test_the_layer_on_triton_matches_the_reference_given_the_same_masks() -> None:
    """NestedLSTM(backend="triton", layer_norm=...) with zoneout and weight drop against backend
    "naive": the path users take."""
    options = {"layer_norm": [True, False], "zoneout_cell": 0.3, "weight_drop": 0.2}
    assert_layer_matches_naive(options, TOL, away_from_init=True)
