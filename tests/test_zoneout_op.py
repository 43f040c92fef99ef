"""Zoneout inside the nested-LSTM op: every CPU implementation against the reference
(``nested_lstm_naive``) given the same keep weights, for outputs, h_n, c_n and every gradient, in
float64; then the op's registrations (opcheck, torch.compile, torch.export) and its input check.
"""

from __future__ import annotations

import pytest
import torch
from test_no_python import _run_without_nestrnn, library  # noqa: F401 (a fixture)
from test_op_nested_lstm import (
    assert_close_all,
    make_case,
    require_implementation,
    run_with_grads,
)

from nestrnn.ops.common.levels import encode_activations, standard_activations
from nestrnn.ops.nested_lstm import nested_lstm, nested_lstm_naive, plan

BACKENDS = ("torch_loop", "c_loop")
STEPS, BATCH, INPUTS, HIDDEN = 5, 3, 2, 4


def masks(depth: int, p: float = 0.5, seed: int = 7) -> torch.Tensor:
    """Training-style 0/1 keep masks (D + 1, T, B, H), fresh per step."""
    gen = torch.Generator().manual_seed(seed)
    shape = (depth + 1, STEPS, BATCH, HIDDEN)
    return torch.bernoulli(torch.full(shape, p, dtype=torch.float64), generator=gen)


def rates(depth: int) -> torch.Tensor:
    """Evaluation-style rates: one per state and unit, expanded with stride 0 along T and B."""
    p = torch.linspace(0.1, 0.8, (depth + 1) * HIDDEN, dtype=torch.float64)
    return p.view(depth + 1, 1, 1, HIDDEN).expand(depth + 1, STEPS, BATCH, HIDDEN)


def with_zoneout(fn, zoneout):
    """``fn`` (the op with a backend, or the reference) as run_with_grads calls it."""

    def run(x, weights, h0, c0, batch_sizes=None, reverse=False, activations=None):
        return fn(x, weights, h0, c0, batch_sizes, reverse, activations, zoneout=zoneout)

    return run


def pinned(backend: str):
    def run(*args, zoneout=None):
        return nested_lstm(*args, backend=backend, zoneout=zoneout)

    return run


def assert_like_reference(backend, depth, zoneout, batch_sizes=None, reverse=False):
    require_implementation(backend)
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, depth, seed=depth)
    args = (x, weights, h0, c0, batch_sizes, reverse)
    got = run_with_grads(with_zoneout(pinned(backend), zoneout), *args)
    want = run_with_grads(with_zoneout(nested_lstm_naive, zoneout), *args)
    assert_close_all(got[0], want[0], atol=1e-10, what=f"{backend} outputs")
    assert_close_all(got[1], want[1], atol=1e-9, what=f"{backend} gradients")


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loop_computes_the_reference_with_masks(backend, depth):
    assert_like_reference(backend, depth, masks(depth))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loop_computes_the_reference_packed_and_reversed(backend):
    batch_sizes = torch.tensor([3, 3, 2, 1, 1])
    assert_like_reference(backend, 2, masks(2, seed=3), batch_sizes, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loop_reads_rates_expanded_with_stride_zero(backend):
    zoneout = rates(3)
    assert zoneout.stride()[1:3] == (0, 0)
    assert_like_reference(backend, 3, zoneout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rates_of_another_dtype_are_read_in_the_state_s(backend):
    assert_like_reference(backend, 2, rates(2).float())


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_zero_zoneout_is_no_zoneout(backend):
    require_implementation(backend)
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2)
    zeros = torch.zeros(3, STEPS, BATCH, HIDDEN, dtype=torch.float64)
    got = run_with_grads(with_zoneout(pinned(backend), zeros), x, weights, h0, c0)
    want = run_with_grads(with_zoneout(pinned(backend), None), x, weights, h0, c0)
    assert_close_all(got[0] + got[1], want[0] + want[1], atol=0, what=backend)


def test_the_reference_keeps_the_whole_state_where_every_weight_is_one():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    ones = torch.ones(3, STEPS, BATCH, HIDDEN, dtype=torch.float64)
    out, h_n, c_n = nested_lstm_naive(x, weights, h0, c0, zoneout=ones)
    torch.testing.assert_close(out, h0.expand_as(out), rtol=0, atol=0)
    torch.testing.assert_close((h_n, c_n), (h0, c0), rtol=0, atol=0)


def test_depth_one_inference_with_zoneout_does_not_run_torch_s_lstm():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 1, requires_grad=False)
    acts = standard_activations(1)
    assert plan(x, None, False, acts, False).implementation == "torch_lstm"
    assert plan(x, None, False, acts, False, zoneout=True).implementation != "torch_lstm"
    zoneout = masks(1)
    with torch.no_grad():
        got = nested_lstm(x, weights, h0, c0, zoneout=zoneout)
    want = nested_lstm_naive(x, weights, h0, c0, zoneout=zoneout)
    assert_close_all(got, want, atol=1e-10)


def test_a_backward_that_records_its_graph_differentiates_zoneout_s_reference():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2)
    zoneout = masks(2)

    def second(fn):
        out, _, _ = fn(x, weights, h0, c0, zoneout=zoneout)
        (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), h0)

    assert_close_all(second(nested_lstm), second(nested_lstm_naive), atol=1e-9)


def test_vmap_over_the_batch_runs_each_with_its_zoneout():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    xs, zs = torch.stack([x, x.flip(0)]), torch.stack([masks(2, seed=1), masks(2, seed=2)])

    def run(x, zoneout):
        return nested_lstm(x, weights, h0, c0, zoneout=zoneout)

    got = torch.func.vmap(run, in_dims=(0, 2))(xs, zs.movedim(0, 2))  # zoneout's batch is dim 2
    for n in range(2):
        want = nested_lstm_naive(xs[n], weights, h0, c0, zoneout=zs[n])
        assert_close_all([t[n] for t in got], want, atol=1e-10)


# ----------------------------------------------------------------------- the op's registrations


def test_opcheck_every_op_with_zoneout():
    x, weights, h0, c0 = make_case(3, 2, 2, 3, 2)
    flat = [w for lw in weights for w in lw]
    zoneout = torch.rand(3, 3, 2, 3, dtype=torch.float64).round()
    bs = torch.tensor([2, 1, 1])
    args = (x, flat, h0, c0, bs, True, encode_activations(standard_activations(2)), "auto")
    for name in ("nested_lstm", "nested_lstm_train"):
        torch.library.opcheck(getattr(torch.ops.nestrnn, name).default, (*args, zoneout))
    x, h0, c0, flat = x.detach(), h0.detach(), c0.detach(), [w.detach() for w in flat]
    out, _, _, *saved = torch.ops.nestrnn.nested_lstm_train(x, flat, h0, c0, *args[4:], zoneout)
    grads = (torch.randn_like(out), torch.randn_like(h0), torch.randn_like(c0))
    needs = [True] * (3 + len(flat))
    backward_args = (x, flat, h0, out, *saved, bs, True, args[6], "auto", *grads, needs, zoneout)
    torch.library.opcheck(torch.ops.nestrnn.nested_lstm_backward.default, backward_args)


def test_compile_fullgraph_with_zoneout_trains_like_eager():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2)
    zoneout = masks(2)

    def run(x, weights, h0, c0, batch_sizes=None, reverse=False, activations=None):
        return nested_lstm(x, weights, h0, c0, zoneout=zoneout)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got = run_with_grads(compiled, x, weights, h0, c0)
    want = run_with_grads(with_zoneout(nested_lstm_naive, zoneout), x, weights, h0, c0)
    assert_close_all(got[0] + got[1], want[0] + want[1], atol=1e-9)


class _Zoned(torch.nn.Module):
    """The op with fixed weights, evaluation's expanded rates passed in."""

    def __init__(self, weights, h0, c0):
        super().__init__()
        self.weights, self.h0, self.c0 = weights, h0, c0

    def forward(self, x, zoneout):
        return nested_lstm(x, self.weights, self.h0, self.c0, zoneout=zoneout)


def test_export_with_zoneout_decomposes_into_a_scan_that_computes_like_eager():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    module, zoneout = _Zoned(weights, h0, c0), masks(2)
    program = torch.export.export(module, (x, zoneout))
    want = nested_lstm_naive(x, weights, h0, c0, zoneout=zoneout)
    assert_close_all(list(program.module()(x, zoneout)), want, atol=1e-10)
    decomposed = program.run_decompositions()
    assert torch.ops.higher_order.scan in {n.target for n in decomposed.graph.nodes}
    assert_close_all(list(decomposed.module()(x, zoneout)), want, atol=1e-10)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda z: z[:, :-1], r"zoneout must be a floating-point \(3, 5, 3, 4\) tensor"),
        (lambda z: z.long(), r"zoneout must be a floating-point \(3, 5, 3, 4\) tensor"),
        (lambda z: z.tolist(), r"zoneout must be .* or None, got list"),
    ],
    ids=["shape", "dtype", "type"],
)
def test_a_bad_zoneout_is_one_clear_error(bad, message):
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    with pytest.raises(ValueError, match=message) as caught:
        nested_lstm(x, weights, h0, c0, zoneout=bad(masks(2)))
    assert "\n" not in str(caught.value)


def test_an_exported_program_with_zoneout_runs_without_nestrnn(library, tmp_path):  # noqa: F811
    """The library for processes without nestrnn has the same schema and computes zoneout."""
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    zoneout = rates(2)
    torch.export.save(torch.export.export(_Zoned(weights, h0, c0), (x, zoneout)), tmp_path / "p")
    want = nested_lstm_naive(x, weights, h0, c0, zoneout=zoneout)
    torch.save((x, zoneout, list(want)), tmp_path / "expected.pt")
    script = """
    from pathlib import Path
    folder = Path(sys.argv[2])
    x, zoneout, expected = torch.load(folder / "expected.pt")
    got = torch.export.load(folder / "p").module()(x, zoneout)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    """
    _run_without_nestrnn(script, str(library), str(tmp_path))
