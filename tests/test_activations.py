"""Every activation, in every implementation, against the one table (``ACTIVATION_TABLE``):
forward values and derivatives.

The table itself is checked first: each ``derivative`` (written in terms of the output) is
autograd's derivative of ``function``. The naive references compute with the table's functions
and autograd, so an implementation that matches them in value and gradient matches the table.
Each implementation then runs with the activation on every slot it has (gate, candidate, cell of
both levels at depth 2; the candidate on the generic path), in float64: the C kernel (``c_loop``),
the PyTorch loop (``torch_loop``), Triton (under ``TRITON_INTERPRET=1`` on CPU), the C++ step
nodes around a memory function of the user's, and the library for processes without nestrnn
(``torch_library.cpp``, inference only; slow: it builds a torch extension). The native kernels know
the activations by code, which tests/test_native_header.py checks against the table.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers_native import require

from nestrnn import MemoryFunction
from nestrnn.activations import ACTIVATION_TABLE, output_derivative
from nestrnn.ops.common import native
from nestrnn.ops.common.levels import encode_activations
from nestrnn.ops.nested_lstm import (
    LevelActivations,
    LevelWeights,
    nested_lstm,
    nested_lstm_naive,
    planning,
)
from nestrnn.ops.outer_lstm import native_nodes, outer_lstm, outer_lstm_naive

NAMES = list(ACTIVATION_TABLE)
T, B, IN, H, D = 3, 2, 3, 4, 2


@pytest.mark.parametrize("name", NAMES)
def test_the_table_s_derivative_is_the_function_s(name):
    # kinks (0 for relu, +-1 for hardtanh) have probability zero among these points
    x = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    x.requires_grad_()
    activation = ACTIVATION_TABLE[name]
    y = activation.function(x)
    (autograd,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(activation.derivative(y.detach()), autograd, rtol=0, atol=1e-12)
    torch.testing.assert_close(output_derivative(name, y.detach()), autograd, rtol=0, atol=1e-12)


def _case(dtype: torch.dtype = torch.float64, leaves: torch.dtype | None = None):
    """x, D levels of weights, h0, c0: values drawn in float64 and rounded to ``dtype`` (the same
    for every dtype), leaves of ``leaves`` (default ``dtype``); weights at scale 1, so that the
    gates' inputs reach beyond hardtanh's +-1."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        drawn = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5
        return drawn.to(dtype).to(leaves or dtype).requires_grad_()

    weights = [
        LevelWeights(r(4 * H, IN if k == 0 else H), r(4 * H, H), r(4 * H), r(4 * H))
        for k in range(D)
    ]
    return r(T, B, IN), weights, r(B, H), r(D, B, H)


def _leaves(case) -> list[torch.Tensor]:
    x, weights, h0, c0 = case
    return [x, *(p for level in weights for p in level), h0, c0]


def _values_and_grads(fn, case) -> list[torch.Tensor]:
    """``fn(*case)``'s outputs and the gradients of a fixed projection of them by every leaf."""
    out = fn(*case)
    g = torch.Generator().manual_seed(1)
    # the same projection in every dtype: drawn in float64
    projections = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    loss = sum((o * p.to(o.dtype)).sum() for o, p in zip(out, projections, strict=True))
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, _leaves(case)))


def _all_slots(name: str) -> list[LevelActivations]:
    """``name`` on each kind of slot, the others as in nn.LSTM: every slot ``name`` would make
    the unbounded activations (identity) grow as a high power of the input."""
    return [LevelActivations("sigmoid", name, name), LevelActivations(name, "tanh", "tanh")]


def _check_op(backend: str, name: str, dtype: torch.dtype = torch.float64) -> None:
    """The op with ``backend`` in ``dtype`` against the naive reference in float64, on the same
    values."""
    activations, tol = _all_slots(name), 1e-9 if dtype == torch.float64 else 2e-5
    reference = _case(dtype, torch.float64)
    want = _values_and_grads(lambda *a: nested_lstm_naive(*a, activations=activations), reference)
    got = _values_and_grads(
        lambda *a: nested_lstm(*a, activations=activations, backend=backend), _case(dtype)
    )
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = max(1.0, b.abs().max().item())  # the error relative to the largest value
        torch.testing.assert_close(
            a.double(), b, rtol=tol, atol=tol * scale, msg=f"{backend} {name} #{index}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_the_c_kernel(name):
    require(native.status(), "CPU kernel")
    _check_op("c_loop", name)


@pytest.mark.parametrize("name", NAMES)
def test_the_pytorch_loop(name):
    _check_op("torch_loop", name)


@pytest.mark.parametrize("name", NAMES)
def test_triton(name, monkeypatch):
    """Under Triton's interpreter on CPU (tests/conftest.py sets ``TRITON_INTERPRET=1``)."""
    pytest.importorskip("triton", reason="triton is not installed (nestrnn[triton])")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    from nestrnn.ops.nested_lstm import triton_loop

    ran = Counter()
    for stage in ("forward", "backward"):
        original = getattr(triton_loop, stage)

        def counted(*args, _original=original, _stage=stage, **kwargs):
            result = _original(*args, **kwargs)
            ran[_stage] += 1
            return result

        monkeypatch.setattr(triton_loop, stage, counted)
    _check_op("triton", name, torch.float32)  # Triton has no float64
    why = planning.failures().get("triton", "not planned")
    assert ran == {"forward": 1, "backward": 1}, f"Triton did not run: {why}"


class _Leaky(MemoryFunction):
    """A memory function of the user's: the generic path, with the native step nodes."""

    def forward(self, gated_cell, gated_input, state):
        return 0.5 * gated_cell + torch.tanh(gated_input), ()


@pytest.mark.parametrize("name", NAMES)
def test_the_step_nodes(name):
    """The generic path has one choice of activation, the candidate's (the gate is sigmoid and
    the cell tanh, as in nn.LSTM)."""
    require(native.status(), "CPU kernel")
    require(native_nodes.status(), "native step nodes")
    x, weights, h0, c0 = _case()
    case = (x, weights[0], _Leaky(H), h0, c0[:1])
    leaves = [x, *weights[0], h0, c0]

    def run(fn):
        out = fn(*case, None, False, name)
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in out)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [o.detach() for o in out] + [g for g in grads if g is not None]

    for index, (a, b) in enumerate(zip(run(outer_lstm), run(outer_lstm_naive), strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{name} #{index}")


# the library's op in a process without nestrnn, on the saved cases; prints "ok"
_LIBRARY_CHECK = """
import sys, torch
torch.ops.load_library(sys.argv[1])
for case, activations, want in torch.load(sys.argv[2]):
    with torch.no_grad():
        got = torch.ops.nestrnn.nested_lstm(*case, None, False, activations, "auto")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=activations)
assert "nestrnn" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_the_library_for_processes_without_nestrnn(tmp_path):
    from nestrnn.ops.nested_lstm import library

    path = library.library_path()
    cases = []
    for name in NAMES:
        x, weights, h0, c0 = _case()
        x, h0, c0 = x.detach(), h0.detach(), c0.detach()
        weights = [LevelWeights(*(p.detach() for p in level)) for level in weights]
        with torch.no_grad():
            want = nested_lstm_naive(x, weights, h0, c0, activations=_all_slots(name))
        flat = [p for level in weights for p in level]
        cases.append(((x, flat, h0, c0), encode_activations(_all_slots(name)), want))
    torch.save(cases, tmp_path / "cases.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_LIBRARY_CHECK),
            str(path),
            str(tmp_path / "cases.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path("/"),  # not the checkout: nestrnn must not be importable by accident
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
