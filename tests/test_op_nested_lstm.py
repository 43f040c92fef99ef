"""The fast nested-LSTM op (``fused.py``) against the naive reference.

Every comparison covers outputs, final h, final cells and EVERY gradient (x, h0, c0, each weight and
bias). ``nested_lstm_fused`` is the public entry (depth 1 goes to torch's own LSTM);
``nested_lstm_own`` is the hand-written autograd Function, tested at depth 1 too, with each of its
time loops: the C kernel ("own-native") and the PyTorch loop ("own-torch").
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestrnn.ops.nested_lstm import native, nested_lstm
from nestrnn.ops.nested_lstm.common import LevelWeights
from nestrnn.ops.nested_lstm.fused import nested_lstm_fused, nested_lstm_own
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive

PATHS = {
    "fused": nested_lstm_fused,
    "own-native": partial(nested_lstm_own, loop="native"),
    "own-torch": partial(nested_lstm_own, loop="torch"),
}
OWN_LOOPS = ("native", "torch")


def require_loop(loop: str) -> None:
    """Skip native-loop tests where the C kernel cannot be built, except where it must be
    (``NESTRNN_REQUIRE_NATIVE=1``, set by CI): there its absence fails the test."""
    if loop in ("native", "own-native") and not native.status().available:
        reason = f"CPU kernel unavailable: {native.status().reason}"
        if os.environ.get("NESTRNN_REQUIRE_NATIVE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


BIAS_MODES = ("both", "none", "ih", "hh")


# ------------------------------------------------------------------------------------- helpers


def make_case(
    steps,
    batch,
    inputs,
    hidden,
    depth,
    *,
    bias="both",
    state=True,
    seed=0,
    dtype=torch.float64,
    requires_grad=True,
):
    """Random x, weights, h0, c0 (zeros when ``state`` is False), all leaves."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        return t.requires_grad_(requires_grad)

    weights = []
    for k in range(depth):
        w_ih = rand(4 * hidden, inputs if k == 0 else hidden)
        w_hh = rand(4 * hidden, hidden)
        b_ih = rand(4 * hidden) if bias in ("both", "ih") else None
        b_hh = rand(4 * hidden) if bias in ("both", "hh") else None
        weights.append(LevelWeights(w_ih, w_hh, b_ih, b_hh))
    x = rand(steps, batch, inputs)
    if state:
        h0, c0 = rand(batch, hidden), rand(depth, batch, hidden)
    else:
        h0 = torch.zeros(batch, hidden, dtype=dtype, requires_grad=requires_grad)
        c0 = torch.zeros(depth, batch, hidden, dtype=dtype, requires_grad=requires_grad)
    return x, weights, h0, c0


def leaves(x, weights, h0, c0):
    return [x, h0, c0, *(w for lw in weights for w in lw if w is not None)]


def run_with_grads(fn, x, weights, h0, c0, batch_sizes=None, reverse=False, seed=1):
    """Outputs plus the gradients of a random linear loss of (output, h_n, c_n) w.r.t. all leaves.
    Loss weights are float64 and fixed by ``seed``, so two runs see the same loss."""
    out, h_n, c_n = fn(x, weights, h0, c0, batch_sizes, reverse)
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64)).sum()
        for t in (out, h_n, c_n)
    )
    wrt = [t for t in leaves(x, weights, h0, c0) if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [out, h_n, c_n], list(grads)


def assert_close_all(got, want, atol, rtol=0.0, what=""):
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        assert g is not None and w is not None, f"{what} item {n}: missing gradient"
        assert g.shape == w.shape, f"{what} item {n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(
            g.double(), w.double(), atol=atol, rtol=rtol, msg=lambda m, n=n: f"{what} item {n}: {m}"
        )


@st.composite
def cases(draw, max_depth=4):
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    packed = draw(st.booleans())
    batch_sizes = None
    if packed:  # non-increasing, batch_sizes[0] == B, later steps may have no active row
        rest = sorted(
            draw(st.lists(st.integers(0, batch), min_size=steps - 1, max_size=steps - 1)),
            reverse=True,
        )
        batch_sizes = torch.tensor([batch, *rest], dtype=torch.int64)
    return {
        "steps": steps,
        "batch": batch,
        "inputs": draw(st.integers(1, 5)),
        "hidden": draw(st.integers(1, 5)),
        "depth": draw(st.integers(1, max_depth)),
        "bias": draw(st.sampled_from(BIAS_MODES)),
        "state": draw(st.booleans()),
        "reverse": draw(st.booleans()),
        "batch_sizes": batch_sizes,
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case, **kw):
    return make_case(
        case["steps"],
        case["batch"],
        case["inputs"],
        case["hidden"],
        case["depth"],
        bias=case["bias"],
        state=case["state"],
        seed=case["seed"],
        **kw,
    )


# ------------------------------------------------------------------------------------- float64


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(deadline=None, max_examples=100)
@given(case=cases())
def test_matches_naive_float64(path, case):
    require_loop(path)
    x, weights, h0, c0 = build(case)
    bs, rev = case["batch_sizes"], case["reverse"]
    got_out, got_grads = run_with_grads(PATHS[path], x, weights, h0, c0, bs, rev)
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0, bs, rev)
    assert_close_all(got_out, want_out, atol=1e-10, what="output/h_n/c_n")
    assert_close_all(got_grads, want_grads, atol=1e-10, what="gradient")


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(deadline=None, max_examples=40)
@given(case=cases(), data=st.data())
def test_chunks_equal_whole_sequence(path, case, data):
    """Two chunks fed the returned state give the whole sequence's outputs, state and gradients."""
    require_loop(path)
    steps, bs, rev = case["steps"], case["batch_sizes"], case["reverse"]
    split = data.draw(st.integers(0, steps))
    x, weights, h0, c0 = build(case)
    fn = PATHS[path]

    def chunked(x, weights, h0, c0, batch_sizes, reverse):
        parts = [slice(0, split), slice(split, steps)]
        h, c, outs = h0, c0, [None, None]
        for n in (1, 0) if reverse else (0, 1):  # reverse: the later chunk is processed first
            sizes = None if batch_sizes is None else batch_sizes[parts[n]]
            outs[n], h, c = fn(x[parts[n]], weights, h, c, sizes, reverse)
        return torch.cat(outs), h, c

    got_out, got_grads = run_with_grads(chunked, x, weights, h0, c0, bs, rev)
    want_out, want_grads = run_with_grads(fn, x, weights, h0, c0, bs, rev)
    assert_close_all(got_out, want_out, atol=1e-10, what="output/h_n/c_n")
    assert_close_all(got_grads, want_grads, atol=1e-10, what="gradient")


@settings(deadline=None, max_examples=30)
@given(case=cases())
def test_inference_matches_naive(case):
    """Without gradients the op keeps only ring buffers; results must not change."""
    x, weights, h0, c0 = build(case, requires_grad=False)
    leaf_args = build(case)  # the same values, requiring grad
    bs, rev = case["batch_sizes"], case["reverse"]
    for name, fn in PATHS.items():
        require_loop(name)
        got = fn(x, weights, h0, c0, bs, rev)
        with torch.no_grad():  # grad mode off, inputs that require grad: the same fast path
            got_ng = fn(*leaf_args, bs, rev)
        want = nested_lstm_naive(x, weights, h0, c0, bs, rev)
        assert_close_all(list(got), list(want), atol=1e-10, what="no-grad output")
        assert_close_all(list(got_ng), list(want), atol=1e-10, what="no_grad() output")
        assert not any(t.requires_grad for t in got_ng)


@pytest.mark.parametrize("loop", OWN_LOOPS)
def test_retain_graph_and_workspace_reuse(loop):
    """Buffers saved for a retained graph are not handed to later calls (the op reuses its CPU
    buffers between calls), and a graph made under inference_mode does not poison the pool."""
    require_loop(loop)
    own = partial(nested_lstm_own, loop=loop)
    x, weights, h0, c0 = make_case(30, 8, 40, 40, 2, dtype=torch.float32, seed=2)
    with torch.inference_mode():
        own(x, weights, h0, c0)
    out = own(x, weights, h0, c0)[0]
    first = torch.autograd.grad(out.sum(), weights[1].weight_ih, retain_graph=True)[0]
    for scale in (2.0, 3.0):  # other calls in between, forward and backward
        own(x * scale, weights, h0, c0)[0].sum().backward()
    second = torch.autograd.grad(out.sum(), weights[1].weight_ih)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_partial_requires_grad(depth):
    """Only x and the outer recurrent weight need gradients; the rest are frozen."""
    x, weights, h0, c0 = make_case(5, 3, 4, 3, depth, requires_grad=False)
    x.requires_grad_()
    weights[0].weight_hh.requires_grad_()
    for name, fn in PATHS.items():
        require_loop(name)
        got_out, got_grads = run_with_grads(fn, x, weights, h0, c0, torch.tensor([3, 3, 2, 1, 1]))
        want_out, want_grads = run_with_grads(
            nested_lstm_naive, x, weights, h0, c0, torch.tensor([3, 3, 2, 1, 1])
        )
        assert len(got_grads) == 2
        assert_close_all(got_out, want_out, atol=1e-10)
        assert_close_all(got_grads, want_grads, atol=1e-10)


@pytest.mark.parametrize("loop", OWN_LOOPS)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("mode", ["plain", "packed_reverse"])
def test_gradcheck(loop, depth, mode):
    require_loop(loop)
    x, weights, h0, c0 = make_case(3, 2, 2, 2, depth, seed=depth)
    bs = torch.tensor([2, 1, 1]) if mode == "packed_reverse" else None
    rev = mode == "packed_reverse"
    flat = [w for lw in weights for w in lw]

    def fn(x, h0, c0, *flat):
        ws = [LevelWeights(*flat[i : i + 4]) for i in range(0, len(flat), 4)]
        return nested_lstm_own(x, ws, h0, c0, bs, rev, loop=loop)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *flat), eps=1e-6, atol=1e-6)


def test_dispatcher_routes_to_fused():
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2, requires_grad=False)
    got = nested_lstm(x, weights, h0, c0, backend="fused")
    want = nested_lstm_naive(x, weights, h0, c0)
    assert_close_all(list(got), list(want), atol=1e-10)


@pytest.mark.parametrize("loop", OWN_LOOPS)
def test_output_is_not_a_view(loop):
    """Outputs can be used (and modified) like any tensor; the op does not hand out its buffers."""
    require_loop(loop)
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2)
    out, h_n, c_n = nested_lstm_own(x, weights, h0, c0, loop=loop)
    assert out._base is None and h_n._base is None and c_n._base is None


def test_empty_sequence_passes_state_through():
    x, weights, h0, c0 = make_case(0, 2, 3, 3, 2, requires_grad=False)
    for name, fn in PATHS.items():
        require_loop(name)
        out, h_n, c_n = fn(x, weights, h0, c0)
        assert out.shape == (0, 2, 3)
        torch.testing.assert_close(h_n, h0)
        torch.testing.assert_close(c_n, c0)


def test_bad_shapes_are_reported():
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2, requires_grad=False)
    with pytest.raises(ValueError, match="c0 must be"):
        nested_lstm_fused(x, weights, h0, c0[:1])
    with pytest.raises(ValueError, match="h0 must be"):
        nested_lstm_fused(x, weights, h0[:1], c0)
    with pytest.raises(ValueError, match="h0 is torch.float32 on cpu but x is torch.float64"):
        nested_lstm_fused(x, weights, h0.float(), c0)
    with pytest.raises(ValueError, match="level 1 weight_hh is torch.float32"):
        w = weights[1]
        nested_lstm_own(x, [weights[0], w._replace(weight_hh=w.weight_hh.float())], h0, c0)
    with pytest.raises(ValueError, match="loop must be one of"):
        nested_lstm_own(x, weights, h0, c0, loop="fortran")


def test_auto_loop_is_native_where_available(monkeypatch):
    """float32/float64 CPU inputs run the C kernel by default; NESTRNN_NATIVE=0 selects the torch
    loop, and asking for the native loop on a device it does not serve is an error."""
    require_loop("native")
    from nestrnn.ops.nested_lstm import fused, fused_native

    x = torch.zeros(2, 2, 3)
    assert fused._loop_for(x, "auto").forward is fused_native.forward
    assert fused._loop_for(x.bfloat16(), "auto") is fused._TORCH_LOOP  # cast to fp32 before
    with pytest.raises(RuntimeError, match="native CPU loop cannot run"):
        fused._loop_for(torch.zeros(2, 2, 3, device="meta"), "native")
    monkeypatch.setenv("NESTRNN_NATIVE", "0")
    assert fused._loop_for(x, "auto") is fused._TORCH_LOOP


# ------------------------------------------------------------------------------------- float32


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("packed_reverse", [False, True])
def test_float32_matches_naive(path, depth, packed_reverse):
    require_loop(path)
    x, weights, h0, c0 = make_case(12, 5, 7, 16, depth, dtype=torch.float32, seed=3)
    with torch.no_grad():  # keep the recurrence in a well-conditioned range
        for lw in weights:
            for w in lw:
                w.mul_(0.3)
    bs = torch.tensor([5] * 4 + [4] * 4 + [2] * 4) if packed_reverse else None
    got_out, got_grads = run_with_grads(PATHS[path], x, weights, h0, c0, bs, packed_reverse)
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0, bs, packed_reverse)
    assert got_out[0].dtype == torch.float32
    assert_close_all(got_out, want_out, atol=1e-5, rtol=1e-4, what="output")
    assert_close_all(got_grads, want_grads, atol=1e-4, rtol=1e-4, what="gradient")


# ------------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("depth", [1, 2])
def test_bfloat16_smoke(path, depth):
    """bf16 in, bf16 out and bf16 gradients, close to the fp32 reference (loose tolerance)."""
    require_loop(path)
    x32, w32, h32, c32 = make_case(8, 4, 6, 8, depth, dtype=torch.float32, seed=5)
    with torch.no_grad():
        for lw in w32:
            for w in lw:
                w.mul_(0.3)

    def to_bf16(t):
        return t.detach().bfloat16().requires_grad_()

    xb, hb, cb = to_bf16(x32), to_bf16(h32), to_bf16(c32)
    wb = [LevelWeights(*(to_bf16(w) for w in lw)) for lw in w32]
    bs = torch.tensor([4, 4, 4, 3, 3, 2, 2, 1])
    got_out, got_grads = run_with_grads(PATHS[path], xb, wb, hb, cb, bs)
    # the reference sees the same bf16-rounded values, computed in fp32
    ref = [t.detach().float().requires_grad_() for t in (xb, hb, cb)]
    wr = [LevelWeights(*(w.detach().float().requires_grad_() for w in lw)) for lw in wb]
    want_out, want_grads = run_with_grads(nested_lstm_naive, ref[0], wr, ref[1], ref[2], bs)
    assert all(t.dtype == torch.bfloat16 for t in got_out + got_grads)
    assert all(torch.isfinite(t).all() for t in got_out + got_grads)
    assert_close_all(got_out, want_out, atol=3e-2, rtol=3e-2, what="bf16 output")
    assert_close_all(got_grads, want_grads, atol=1e-1, rtol=5e-2, what="bf16 gradient")
