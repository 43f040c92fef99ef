"""Zoneout inside the Triton kernels: ``triton_loop.forward`` / ``backward`` with keep weights
against a reference under autograd written from the formula of the op's ``zoneout`` argument.

At step t the cell is computed as without zoneout from the carried state; what is carried (and
output) is ``keep * previous + (1 - keep) * new`` per state (the D cells, then h). The reference
and the runs are ``helpers_triton_loops``'s (the interpreter on CPU, or CUDA with
``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import pytest
import torch
from helpers_triton_loops import (
    PACKED,
    B,
    H,
    T,
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
skip_without_a_device()
TOL = 2e-5  # float32, as test_op_triton.py


@pytest.mark.parametrize(
    ("depth", "batch_sizes", "reverse", "config"),
    [
        (1, None, False, None),
        (2, PACKED, False, None),
        (2, None, True, None),
        (3, PACKED, True, "cublas"),
    ],
    ids=["depth 1", "depth 2 packed", "depth 2 reverse", "depth 3 packed reverse cublas"],
)
def test_training_masks_match_the_formula(depth, batch_sizes, reverse, config, monkeypatch):
    pin_config(monkeypatch, config and cublas_config())
    case, zoneout = make_case(depth), masks(depth)
    want = reference_results(case, batch_sizes, reverse, zoneout)
    assert not errors(triton_results(case, batch_sizes, reverse, zoneout), want, TOL)


def test_evaluation_rate_expanded_with_stride_zero():
    """Evaluation passes the rate per state and unit expanded along T and B (strides 0), here in
    float64: the kernels read it through its strides, in their own dtype."""
    depth = 2
    rate = torch.tensor([0.1, 0.5, 0.3], dtype=torch.float64)[:, None] * torch.linspace(0, 1, H)
    zoneout = rate.view(depth + 1, 1, 1, H).expand(depth + 1, T, B, H)
    assert zoneout.stride()[:3] == (H, 0, 0)
    case = make_case(depth, seed=2)
    want = reference_results(case, PACKED, True, zoneout)
    assert not errors(triton_results(case, PACKED, True, zoneout), want, TOL)


def test_all_zero_masks_equal_no_zoneout():
    depth = 2
    case = make_case(depth, seed=3)
    plain = triton_results(case, PACKED, False, None)
    zero = triton_results(case, PACKED, False, torch.zeros(depth + 1, T, B, H))
    for name, want in plain.items():
        torch.testing.assert_close(zero[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_the_layer_on_triton_matches_the_reference_given_the_same_masks() -> None:
    """NestedLSTM(backend="triton") with weight drop and zoneout against backend "naive": the
    path users take, through the op."""
    options = {"weight_drop": 0.3, "zoneout_cell": [0.3, 0.5], "zoneout_hidden": 0.2}
    assert_layer_matches_naive(options, TOL)
