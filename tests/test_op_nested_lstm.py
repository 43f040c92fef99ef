"""The whole-sequence nested-LSTM op against its naive reference, implementation by implementation.

Every comparison covers outputs, final h, final cells and EVERY gradient (x, h0, c0, each weight
and bias), in float64 unless said otherwise. ``IMPLEMENTATIONS`` are the op's CPU implementations
pinned through ``backend``; "auto" is what users get. The Triton kernels have their own file
(test_op_triton.py); the PyTorch-2 transforms (compile, export, ...) too (test_transforms.py).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from helpers_native import require
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from nestrnn.activations import ACTIVATIONS
from nestrnn.ops.common import native
from nestrnn.ops.common.gradients import input_gradient
from nestrnn.ops.common.levels import encode_activations, standard_activations
from nestrnn.ops.nested_lstm import (
    LevelActivations,
    LevelWeights,
    nested_lstm,
    nested_lstm_naive,
    plan,
    planning,
)

IMPLEMENTATIONS = ("c_loop", "torch_loop", "auto")
BIAS_MODES = ("both", "none", "ih", "hh")


def require_implementation(backend: str) -> None:
    """Skip (or, under CI, fail) C-loop tests where the kernel cannot be built."""
    if backend == "c_loop":
        require(native.status(), "CPU kernel")


def op(backend: str):
    def run(x, weights, h0, c0, batch_sizes=None, reverse=False, activations=None):
        return nested_lstm(x, weights, h0, c0, batch_sizes, reverse, activations, backend)

    return run


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


def run_with_grads(
    fn, x, weights, h0, c0, batch_sizes=None, reverse=False, activations=None, seed=1
):
    """Outputs plus the gradients of a random linear loss of (output, h_n, c_n) w.r.t. all leaves.
    Loss weights are float64 and fixed by ``seed``, so two runs see the same loss."""
    out, h_n, c_n = fn(x, weights, h0, c0, batch_sizes, reverse, activations)
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


def level_activations(draw, depth: int) -> tuple[LevelActivations, ...] | None:
    """None (the paper's) or a variant: any activation per level, sigmoid-like gates kept
    bounded so that the float64 comparison stays well conditioned."""
    if not draw(st.booleans()):
        return None
    names = st.sampled_from(sorted(ACTIVATIONS))
    gates = st.sampled_from(["sigmoid", "hardtanh", "softsign"])
    return tuple(LevelActivations(draw(gates), draw(names), draw(names)) for _ in range(depth))


@st.composite
def cases(draw, max_depth=4):
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    batch_sizes = None
    if draw(st.booleans()):  # non-increasing; rows may be inactive from the first step on
        sizes = sorted(draw(st.lists(st.integers(0, batch), min_size=steps, max_size=steps)))
        batch_sizes = torch.tensor(sizes[::-1], dtype=torch.int64)
    depth = draw(st.integers(1, max_depth))
    return {
        "steps": steps,
        "batch": batch,
        "inputs": draw(st.integers(1, 5)),
        "hidden": draw(st.integers(1, 5)),
        "depth": depth,
        "bias": draw(st.sampled_from(BIAS_MODES)),
        "state": draw(st.booleans()),
        "reverse": draw(st.booleans()),
        "batch_sizes": batch_sizes,
        "activations": level_activations(draw, depth),
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


def case_args(case):
    return case["batch_sizes"], case["reverse"], case["activations"]


# ------------------------------------------------------------------------------------- float64


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@settings(deadline=None, max_examples=60)
@given(case=cases())
def test_matches_naive_float64(backend, case):
    require_implementation(backend)
    x, weights, h0, c0 = build(case)
    got_out, got_grads = run_with_grads(op(backend), x, weights, h0, c0, *case_args(case))
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0, *case_args(case))
    assert_close_all(got_out, want_out, atol=1e-10, what="output/h_n/c_n")
    assert_close_all(got_grads, want_grads, atol=1e-10, what="gradient")


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@settings(deadline=None, max_examples=25)
@given(case=cases(), data=st.data())
def test_chunks_equal_whole_sequence(backend, case, data):
    """Two chunks fed the returned state give the whole sequence's outputs, state and gradients."""
    require_implementation(backend)
    steps, bs, rev, acts = case["steps"], *case_args(case)
    split = data.draw(st.integers(0, steps))
    x, weights, h0, c0 = build(case)
    fn = op(backend)

    def chunked(x, weights, h0, c0, batch_sizes, reverse, activations):
        parts = [slice(0, split), slice(split, steps)]
        h, c, outs = h0, c0, [None, None]
        for n in (1, 0) if reverse else (0, 1):  # reverse: the later chunk is processed first
            sizes = None if batch_sizes is None else batch_sizes[parts[n]]
            outs[n], h, c = fn(x[parts[n]], weights, h, c, sizes, reverse, activations)
        return torch.cat(outs), h, c

    got_out, got_grads = run_with_grads(chunked, x, weights, h0, c0, bs, rev, acts)
    want_out, want_grads = run_with_grads(fn, x, weights, h0, c0, bs, rev, acts)
    assert_close_all(got_out, want_out, atol=1e-10, what="output/h_n/c_n")
    assert_close_all(got_grads, want_grads, atol=1e-10, what="gradient")


@settings(deadline=None, max_examples=30)
@given(case=cases())
def test_inference_matches_naive(case):
    """Without gradients the op runs its inference implementations (torch's LSTM at depth 1, ring
    buffers in the C loop); results must not change."""
    x, weights, h0, c0 = build(case, requires_grad=False)
    leaf_args = build(case)  # the same values, requiring grad
    want = nested_lstm_naive(x, weights, h0, c0, *case_args(case))
    for backend in IMPLEMENTATIONS:
        require_implementation(backend)
        got = op(backend)(x, weights, h0, c0, *case_args(case))
        with torch.no_grad():  # grad mode off, inputs that require grad: the inference op too
            got_ng = op(backend)(*leaf_args, *case_args(case))
        assert_close_all(list(got), list(want), atol=1e-10, what="no-grad output")
        assert_close_all(list(got_ng), list(want), atol=1e-10, what="no_grad() output")
        assert not any(t.requires_grad for t in got_ng)


@pytest.mark.parametrize("backend", ("c_loop", "torch_loop"))
def test_retain_graph_and_workspace_reuse(backend):
    """Buffers saved for a retained graph are not handed to later calls (the C loop reuses its
    CPU buffers between calls), and a graph made under inference_mode does not poison the pool."""
    require_implementation(backend)
    x, weights, h0, c0 = make_case(30, 8, 40, 40, 2, dtype=torch.float32, seed=2)
    fn = op(backend)
    with torch.inference_mode():
        fn(x, weights, h0, c0)
    out = fn(x, weights, h0, c0)[0]
    first = torch.autograd.grad(out.sum(), weights[1].weight_ih, retain_graph=True)[0]
    for scale in (2.0, 3.0):  # other calls in between, forward and backward
        fn(x * scale, weights, h0, c0)[0].sum().backward()
    second = torch.autograd.grad(out.sum(), weights[1].weight_ih)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("depth", [1, 3])
def test_partial_requires_grad(depth):
    """Only x and the outer recurrent weight need gradients; the rest are frozen."""
    x, weights, h0, c0 = make_case(5, 3, 4, 3, depth, requires_grad=False)
    x.requires_grad_()
    weights[0].weight_hh.requires_grad_()
    sizes = torch.tensor([3, 3, 2, 1, 1])
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0, sizes)
    for backend in IMPLEMENTATIONS:
        require_implementation(backend)
        got_out, got_grads = run_with_grads(op(backend), x, weights, h0, c0, sizes)
        assert len(got_grads) == 2
        assert_close_all(got_out, want_out, atol=1e-10)
        assert_close_all(got_grads, want_grads, atol=1e-10)


@pytest.mark.parametrize("backend", ("c_loop", "torch_loop"))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("mode", ["plain", "packed_reverse_variant"])
def test_gradcheck(backend, depth, mode):
    require_implementation(backend)
    x, weights, h0, c0 = make_case(3, 2, 2, 2, depth, seed=depth)
    variant = mode != "plain"
    bs = torch.tensor([2, 1, 1]) if variant else None
    acts = (LevelActivations("sigmoid", "softsign", "tanh"),) * depth if variant else None
    flat = [w for lw in weights for w in lw]

    def fn(x, h0, c0, *flat):
        ws = [LevelWeights(*flat[i : i + 4]) for i in range(0, len(flat), 4)]
        return nested_lstm(x, ws, h0, c0, bs, variant, acts, backend)

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *flat), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_gradient_of_any_width(dtype):
    """dz @ W_ih, in float32 through a weight padded to a multiple of 16 columns."""
    torch.manual_seed(0)
    dz = torch.randn(37, 12, dtype=dtype)
    for width in (1, 5, 16, 17, 75):
        weight = torch.randn(12, width, dtype=dtype)
        got = input_gradient(dz, weight)
        assert got.is_contiguous() and got.shape == (37, width)
        torch.testing.assert_close(got, dz.mm(weight))


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
def test_output_is_not_a_view(backend):
    """Outputs can be used (and modified) like any tensor; the op does not hand out its buffers."""
    require_implementation(backend)
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2)
    out, h_n, c_n = op(backend)(x, weights, h0, c0)
    assert out._base is None and h_n._base is None and c_n._base is None


def test_empty_sequence_passes_state_through():
    x, weights, h0, c0 = make_case(0, 2, 3, 3, 2)
    for backend in IMPLEMENTATIONS:
        require_implementation(backend)
        out, h_n, c_n = op(backend)(x, weights, h0, c0)
        assert out.shape == (0, 2, 3)
        torch.testing.assert_close(h_n, h0)
        torch.testing.assert_close(c_n, c0)
        (h_n.sum() + c_n.sum()).backward()
        torch.testing.assert_close(h0.grad, torch.ones_like(h0))
        h0.grad = c0.grad = None


def test_bad_inputs_are_reported():
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2, requires_grad=False)
    with pytest.raises(ValueError, match=r"c0 must be \(2, 2, 3\)"):
        nested_lstm(x, weights, h0, c0[:1])
    with pytest.raises(ValueError, match=r"h0 must be \(2, 3\)"):
        nested_lstm(x, weights, h0[:1], c0)
    with pytest.raises(ValueError, match="h0 is torch.float32 on cpu but x is torch.float64"):
        nested_lstm(x, weights, h0.float(), c0)
    with pytest.raises(ValueError, match="level 1 weight_hh is torch.float32"):
        w = weights[1]
        nested_lstm(x, [weights[0], w._replace(weight_hh=w.weight_hh.float())], h0, c0)
    with pytest.raises(ValueError, match="batch_sizes must be non-increasing"):
        nested_lstm(x, weights, h0, c0, torch.tensor([1, 2, 2, 1]))
    with pytest.raises(ValueError, match="level 0 candidate activation must be one of"):
        nested_lstm(x, weights, h0, c0, activations=(LevelActivations(candidate="tanhh"),) * 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        nested_lstm(x, weights, h0, c0, backend="fortran")


# ------------------------------------------------------------------------------------- plans


def test_plans_on_cpu():
    """What runs where: tests assert plans, not private names."""
    x = torch.zeros(3, 2, 4)
    std1, std2 = standard_activations(1), standard_activations(2)
    assert plan(x, None, False, std1, training=False).implementation == "torch_lstm"
    expected = "c_loop" if native.status().available else "torch_loop"
    assert plan(x, None, False, std1, training=True).implementation == expected
    # eager training at depth 1 runs torch's LSTM with its own autograd, outside the op
    assert plan(x, None, False, std1, training=True, eager=True).implementation == "torch_lstm"
    assert plan(x, None, False, std2, training=True, eager=True).implementation == expected
    assert plan(x, None, False, std2, training=False).implementation == expected
    assert plan(x.bfloat16(), None, False, std2, training=True).implementation == expected
    # packed in reverse is beyond torch's LSTM kernel; so is a variant
    packed = torch.tensor([2, 2, 1])
    assert plan(x, packed, True, std1, training=False).implementation == expected
    relu = (LevelActivations(candidate="relu"),)
    assert plan(x, None, False, relu, training=False).implementation == expected
    assert plan(x, None, False, std2, True, "torch_loop").implementation == "torch_loop"
    with pytest.raises(
        RuntimeError, match="torch_lstm implementation cannot run this call: it trains"
    ):
        plan(x, None, False, std1, training=True, backend="torch_lstm")
    with pytest.raises(RuntimeError, match="the c_loop implementation cannot run this call: input"):
        plan(x.to("meta"), None, False, std2, training=True, backend="c_loop")


def _cuda_input(steps: int, batch: int, features: int, dtype=torch.float32) -> Tensor:
    """A fake CUDA tensor: plans look at devices, dtypes and shapes only, so no GPU is needed."""
    with FakeTensorMode():
        return torch.empty(steps, batch, features, dtype=dtype, device="cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_auto_plans_on_cuda_follow_the_measurements(monkeypatch):
    """``auto`` on CUDA: cuDNN at depth 1 but where the kernels measured faster, else Triton."""

    def auto(x, acts, training, hidden, eager=False, batch_sizes=None):
        return plan(
            x, batch_sizes, False, acts, training, eager=eager, hidden=hidden
        ).implementation

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # it refuses bfloat16
    small, large = _cuda_input(3, 32, 256), _cuda_input(3, 256, 1024)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _check_auto_plans(auto, small, large)
        torch.backends.cuda.matmul.allow_tf32 = True  # not measured: cuDNN at depth 1
        assert auto(small, standard_activations(1), False, 256) == "torch_lstm"
        assert auto(large, standard_activations(2), True, 1024) == "triton"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    with pytest.warns(RuntimeWarning, match="planted"):
        planning.mark_broken("triton", "planted")
    try:  # kernels that failed: cuDNN where it runs, else the PyTorch loop
        assert auto(small, standard_activations(1), False, 256) == "torch_lstm"
        assert auto(small, standard_activations(2), True, 256) == "torch_loop"
    finally:
        planning.forget_failures()


def _check_auto_plans(auto, small: Tensor, large: Tensor) -> None:
    std1, std2, std3 = (standard_activations(d) for d in (1, 2, 3))
    relu = (LevelActivations(candidate="relu"),)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = small.to(dtype)  # B * H = 32 * 256: the kernels beat cuDNN at depth 1 but in float16
        depth1 = "torch_lstm" if dtype == torch.float16 else "triton"
        assert auto(x, std1, False, 256) == depth1
        assert auto(x, std1, True, 256, eager=True) == depth1
        assert auto(x, std1, False, None) == "torch_lstm"  # hidden size unknown: cuDNN
        assert auto(x, std1, True, 256) == "triton"  # training inside the op (compiled, say)
        assert auto(x, relu, False, 256) == "triton"  # a variant: beyond cuDNN
        assert auto(x, std1, False, 256, batch_sizes=torch.tensor([2, 2, 0])) == "triton"
        assert auto(x, std2, True, 256) == "triton"
        xl = large.to(dtype)  # B * H = 256 * 1024: cuDNN at depth 1, the kernels beyond
        assert auto(xl, std1, False, 1024) == "torch_lstm"
        assert auto(xl, std2, True, 1024) == "triton"
        assert auto(xl, std3, False, 1024) == "triton"
    medium = _cuda_input(3, 128, 512)  # the kernels beat cuDNN at depth 1 in bfloat16 only
    assert auto(medium.to(torch.bfloat16), std1, False, 512) == "triton"
    assert auto(medium, std1, False, 512) == "torch_lstm"


def test_triton_backend_falls_back_with_one_warning():
    """backend='triton' where Triton cannot run (float64) runs the fused choice, warns once."""
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [run_with_grads(op("triton"), x, weights, h0, c0) for _ in range(2)]
    messages = [str(w.message) for w in caught if "backend 'triton' cannot run" in str(w.message)]
    assert len(messages) == 1 and "input dtype torch.float64" in messages[0]
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0)
    assert_close_all(got[1][0], want_out, atol=1e-10)
    assert_close_all(got[1][1], want_grads, atol=1e-10)


def test_a_triton_failure_at_run_time_falls_back_once(monkeypatch):
    """A kernel that fails on the user's GPU (here: under the interpreter, made to fail) is
    recorded and warned about once; the call and every later one run the fused choice."""
    pytest.importorskip("triton")
    from nestrnn.ops.nested_lstm import planning, triton_loop

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_loop, "forward", broken)
    x, weights, h0, c0 = make_case(4, 2, 3, 3, 2, dtype=torch.float32)
    acts = standard_activations(2)
    assert plan(x, None, False, acts, training=True, backend="triton").implementation == "triton"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [run_with_grads(op("triton"), x, weights, h0, c0) for _ in range(2)]
        failed = [w for w in caught if "PTX assembly failed" in str(w.message)]
        assert len(failed) == 1 and "the triton implementation failed" in str(failed[0].message)
        assert "triton" in planning.failures()
        assert plan(x, None, False, acts, training=True, backend="auto").implementation != "triton"
        want = run_with_grads(nested_lstm_naive, x, weights, h0, c0)
        for result in got:
            assert_close_all(result[0], want[0], atol=1e-5)
            assert_close_all(result[1], want[1], atol=1e-4)
    finally:
        planning.forget_failures()


# ------------------------------------------------------------------------------------- float32


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("packed_reverse", [False, True])
def test_float32_matches_naive(backend, depth, packed_reverse):
    require_implementation(backend)
    x, weights, h0, c0 = make_case(12, 5, 7, 16, depth, dtype=torch.float32, seed=3)
    with torch.no_grad():  # keep the recurrence in a well-conditioned range
        for lw in weights:
            for w in lw:
                w.mul_(0.3)
    bs = torch.tensor([5] * 4 + [4] * 4 + [2] * 4) if packed_reverse else None
    args = (bs, packed_reverse)
    got_out, got_grads = run_with_grads(op(backend), x, weights, h0, c0, *args)
    want_out, want_grads = run_with_grads(nested_lstm_naive, x, weights, h0, c0, *args)
    assert got_out[0].dtype == torch.float32
    assert_close_all(got_out, want_out, atol=1e-5, rtol=1e-4, what="output")
    assert_close_all(got_grads, want_grads, atol=1e-4, rtol=1e-4, what="gradient")


# ------------------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("backend", IMPLEMENTATIONS)
@pytest.mark.parametrize("depth", [1, 2])
def test_bfloat16_smoke(backend, depth):
    """bf16 in, bf16 out and bf16 gradients, close to the fp32 reference (loose tolerance)."""
    require_implementation(backend)
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
    got_out, got_grads = run_with_grads(op(backend), xb, wb, hb, cb, bs)
    # the reference sees the same bf16-rounded values, computed in fp32
    ref = [t.detach().float().requires_grad_() for t in (xb, hb, cb)]
    wr = [LevelWeights(*(w.detach().float().requires_grad_() for w in lw)) for lw in wb]
    want_out, want_grads = run_with_grads(nested_lstm_naive, ref[0], wr, ref[1], ref[2], bs)
    assert all(t.dtype == torch.bfloat16 for t in got_out + got_grads)
    assert all(torch.isfinite(t).all() for t in got_out + got_grads)
    assert_close_all(got_out, want_out, atol=3e-2, rtol=3e-2, what="bf16 output")
    assert_close_all(got_grads, want_grads, atol=1e-1, rtol=5e-2, what="bf16 gradient")


# ------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["plain", "packed_reverse_variant_nobias"])
def test_opcheck_every_op(depth, mode):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    variant = mode != "plain"
    x, weights, h0, c0 = make_case(3, 2, 2, 3, depth, bias="hh" if variant else "both")
    flat = [w if w is not None else x.new_empty(0) for lw in weights for w in lw]
    acts = standard_activations(depth)
    if variant:
        acts = (LevelActivations(candidate="softsign"),) * depth
    bs = torch.tensor([2, 1, 1]) if variant else None
    args = (x, flat, h0, c0, bs, variant, encode_activations(acts), "auto")
    for name in ("nested_lstm", "nested_lstm_train"):
        torch.library.opcheck(getattr(torch.ops.nestrnn, name).default, args)
    # the backward op runs inside a backward pass: its inputs do not require grad
    x, h0, c0, flat = x.detach(), h0.detach(), c0.detach(), [w.detach() for w in flat]
    out, _, _, *saved = torch.ops.nestrnn.nested_lstm_train(x, flat, h0, c0, *args[4:])
    grads = (torch.randn_like(out), torch.randn_like(h0), torch.randn_like(c0))
    needs = [True, True, True, *(w.numel() > 0 for w in flat)]
    backward_args = (x, flat, h0, out, *saved, bs, variant, args[6], "auto", *grads, needs)
    torch.library.opcheck(torch.ops.nestrnn.nested_lstm_backward.default, backward_args)


def test_every_activation_in_place_computes_the_activation():
    """The PyTorch loop activates its buffers in place: one table, for every activation name."""
    from nestrnn.activations import ACTIVATIONS
    from nestrnn.ops.common.reference import ACTIVATIONS_INPLACE

    assert list(ACTIVATIONS_INPLACE) == list(ACTIVATIONS)
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    for name, activation in ACTIVATIONS.items():
        y = x.clone()
        ACTIVATIONS_INPLACE[name](y)
        torch.testing.assert_close(y, activation(x), rtol=0, atol=0, msg=name)
