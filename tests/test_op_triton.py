"""The op's Triton implementation against the naive reference: outputs, final states, every gradient.

Every comparison calls ``nested_lstm(..., backend="triton")``, the path users take, and checks that
the Triton kernels ran to completion (that backend falls back to another implementation, with one
warning, where they cannot run or fail). It runs the kernels under Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, so CI needs no GPU. The variable is read when the kernels
are decorated, so it must be set before the first ``import triton``: this module sets it at import
time (``setdefault``, so ``TRITON_INTERPRET=0 pytest ...`` on a GPU machine runs the same checks on
CUDA with the real compiler); ``tests/conftest.py`` sets it for the whole session too.

bfloat16 is computed wrongly by the interpreter, so bf16 and CUDA-graph tests run only on CUDA
without the interpreter (``benchmarks/gpu_check.py`` is the one-command GPU check).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip(
    "triton", reason="triton is not installed (optional dependency nestrnn[triton])"
)

from nestrnn.ops.common.levels import standard_activations
from nestrnn.ops.nested_lstm import (
    LevelActivations,
    LevelWeights,
    nested_lstm,
    nested_lstm_naive,
    plan,
    planning,
    triton_graphs,
    triton_loop,
)
from nestrnn.ops.nested_lstm.triton_configs import TritonConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
ON_CUDA = not INTERPRET
cuda_only = pytest.mark.skipif(
    not ON_CUDA, reason="needs a CUDA device with TRITON_INTERPRET unset (interpreter run)"
)
REPO = Path(__file__).resolve().parents[1]

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-9}
NAMES = ("output", "h_n", "c_n", "grad x", "grad h0", "grad c0")
PACKED = torch.tensor([3, 3, 2, 1, 1])  # T = 5, B = 3
#: which of a level's two biases exist
BIASES = {"both": (True, True), "none": (False, False), "ih": (True, False), "hh": (False, True)}


# ------------------------------------------------------------------------------------- helpers


def make_case(T, B, In, H, D, biases="both", zero_state=False, seed=0):
    """fp64 leaves: x, D LevelWeights, h0, c0. ``biases``: a key of BIASES for every level, or a
    tuple of keys, one per level."""
    g = torch.Generator().manual_seed(seed)
    per_level = (biases,) * D if isinstance(biases, str) else biases

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    weights = []
    for k, kind in enumerate(per_level):
        has_ih, has_hh = BIASES[kind]
        weights.append(
            LevelWeights(
                rnd(4 * H, In if k == 0 else H) * 0.5,
                rnd(4 * H, H) * 0.5,
                rnd(4 * H) * 0.5 if has_ih else None,
                rnd(4 * H) * 0.5 if has_hh else None,
            )
        )
    x = rnd(T, B, In)
    h0 = torch.zeros(B, H, dtype=torch.float64) if zero_state else rnd(B, H)
    c0 = torch.zeros(D, B, H, dtype=torch.float64) if zero_state else rnd(D, B, H)
    return x, weights, h0, c0


def rounded(case, dtype):
    """The case's values rounded to ``dtype``, in fp64: what the reference must see."""
    x, weights, h0, c0 = case
    weights = [
        LevelWeights(*[None if p is None else p.to(dtype).double() for p in lw]) for lw in weights
    ]
    return x.to(dtype).double(), weights, h0.to(dtype).double(), c0.to(dtype).double()


def in_float32(case):
    """The case's leaves in float32 on DEVICE, without gradients."""
    x, weights, h0, c0 = case
    weights = [
        LevelWeights(*[None if p is None else p.float().to(DEVICE) for p in lw]) for lw in weights
    ]
    return x.float().to(DEVICE), weights, h0.float().to(DEVICE), c0.float().to(DEVICE)


def triton_op(x, weights, h0, c0, batch_sizes=None, reverse=False, activations=None):
    return nested_lstm(x, weights, h0, c0, batch_sizes, reverse, activations, backend="triton")


def run_op(fn, case, batch_sizes, reverse, activations, dtype, device):
    """Run ``fn`` on copies of the case's leaves in ``dtype``; backprop a fixed random projection.
    Returns every output and gradient by name, in fp64 on CPU."""
    x, weights, h0, c0 = case
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, h0, c0)]
    wts = [
        LevelWeights(
            *[None if p is None else p.detach().to(device, dtype).requires_grad_() for p in lw]
        )
        for lw in weights
    ]
    out = fn(leaves[0], wts, leaves[1], leaves[2], batch_sizes, reverse, activations)
    g = torch.Generator().manual_seed(1234)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(device)).sum()
        for o in out
    )
    loss.backward()
    results = {name: o.detach().double().cpu() for name, o in zip(NAMES[:3], out)}
    for name, leaf in zip(NAMES[3:], leaves):
        results[name] = leaf.grad.double().cpu()
    for k, lw in enumerate(wts):
        for name, p in zip(LevelWeights._fields, lw):
            if p is not None:
                results[f"level {k} {name}"] = p.grad.double().cpu()
    return results


def errors_vs_naive(dtype, case, batch_sizes=None, reverse=False, activations=None, fn=triton_op):
    """``fn`` in ``dtype`` on DEVICE against the naive reference in fp64 on the same rounded
    values: the names whose scaled max error exceeds TOL[dtype], with the error."""
    case = rounded(case, dtype)
    ref = run_op(nested_lstm_naive, case, batch_sizes, reverse, activations, torch.float64, "cpu")
    got = run_op(fn, case, batch_sizes, reverse, activations, dtype, DEVICE)
    assert ref.keys() == got.keys()
    n_weights = sum(p is not None for lw in case[1] for p in lw)
    assert len(got) == 6 + n_weights  # every gradient is there
    bad = []
    for name, want in ref.items():
        err = (got[name] - want).abs().max().item() / max(1.0, want.abs().max().item())
        if not err <= TOL[dtype]:
            bad.append(f"{name}: scaled max error {err:.2e}")
    return bad


@contextlib.contextmanager
def expect_triton_runs(forward=1, backward=1):
    """Fail unless the block ran exactly this many Triton forwards and backwards to completion."""
    done = Counter()

    def counting(name):
        original = getattr(triton_loop, name)

        def run(*args, **kwargs):
            result = original(*args, **kwargs)
            done[name] += 1
            return result

        return run

    with (
        mock.patch.object(triton_loop, "forward", counting("forward")),
        mock.patch.object(triton_loop, "backward", counting("backward")),
    ):
        yield
    why = planning.failures().get("triton", "not planned")
    assert (done["forward"], done["backward"]) == (forward, backward), f"Triton did not run: {why}"


def forced_config(config: TritonConfig):
    """Launch the kernels with ``config``'s fields instead of ``pick_config``'s choice."""
    choose = triton_loop.pick_config
    return mock.patch.object(
        triton_loop,
        "pick_config",
        lambda batch, hidden, _=None, dtype=torch.float32, graphed=False: choose(
            batch, hidden, config, dtype, graphed
        ),
    )


def check(
    dtype,
    T,
    B,
    In,
    H,
    D,
    batch_sizes=None,
    reverse=False,
    biases="both",
    zero_state=False,
    activations=None,
    seed=0,
):
    """The Triton kernels (one forward, one backward) match the reference in ``dtype``."""
    case = make_case(T, B, In, H, D, biases, zero_state, seed)
    with expect_triton_runs():
        bad = errors_vs_naive(dtype, case, batch_sizes, reverse, activations)
    assert not bad, f"{dtype} D={D} H={H}: " + "; ".join(bad)


# ------------------------------------------------------------------------------- the kernels

# (depth, hidden, batch_sizes, reverse, biases, zero_state): depths 1-3, H incl. non-powers of two
FP32_CASES = [
    (1, 8, None, False, "both", False),
    (1, 17, PACKED, True, "both", False),
    (2, 17, None, False, "both", False),
    (2, 3, PACKED, False, "none", False),
    (2, 8, None, True, "both", True),
    (3, 17, PACKED, True, "both", False),
    (3, 8, None, False, "none", False),
    (3, 3, None, True, "both", False),
]


@pytest.mark.parametrize(
    ("depth", "hidden", "batch_sizes", "reverse", "biases", "zero_state"), FP32_CASES
)
def test_fp32_matches_naive(depth, hidden, batch_sizes, reverse, biases, zero_state):
    check(torch.float32, 5, 3, 4, hidden, depth, batch_sizes, reverse, biases, zero_state)


FP16_CASES = [
    (1, 17, None, False, "both"),
    (2, 8, PACKED, True, "both"),
    (3, 17, None, False, "none"),
    (3, 3, PACKED, False, "both"),
]


@pytest.mark.parametrize(("depth", "hidden", "batch_sizes", "reverse", "biases"), FP16_CASES)
def test_fp16_matches_naive(depth, hidden, batch_sizes, reverse, biases):
    check(torch.float16, 5, 3, 6, hidden, depth, batch_sizes, reverse, biases)


def acts(*levels: str) -> tuple[LevelActivations, ...]:
    """``acts("sigmoid,relu,softsign", ...)``: one ``gate,candidate,cell`` string a level."""
    return tuple(LevelActivations(*level.split(",")) for level in levels)


# Over the two depth-3 cases every activation takes every role (gate, candidate, cell) once.
VARIANT_CASES = {
    "depth 1, no bias": (acts("softsign,relu,hardtanh"), ("none",)),
    "outer candidate tanh": (acts("sigmoid,tanh,tanh", "sigmoid,tanh,tanh"), ("both", "both")),
    "softsign cell, bias-free level": (
        acts("sigmoid,identity,tanh", "sigmoid,tanh,softsign"),
        ("both", "none"),
    ),
    "depth 3 A": (
        acts("sigmoid,relu,softsign", "tanh,hardtanh,identity", "softsign,identity,relu"),
        ("none", "both", "ih"),
    ),
    "depth 3 B": (
        acts("hardtanh,softsign,hardtanh", "identity,sigmoid,sigmoid", "relu,tanh,tanh"),
        ("hh", "none", "both"),
    ),
}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # tanh, sigmoid saturate
@pytest.mark.parametrize("name", VARIANT_CASES)
def test_activation_variants_and_bias_free_levels_match_naive(name):
    activations, biases = VARIANT_CASES[name]
    packed = len(activations) != 2  # both modes, and reverse, across the cases
    check(
        torch.float32,
        5,
        3,
        4,
        8,
        len(activations),
        PACKED if packed else None,
        reverse=len(activations) == 3,
        biases=biases,
        activations=activations,
    )


@pytest.mark.parametrize(("depth", "batch_sizes", "reverse"), [(2, PACKED, False), (3, None, True)])
def test_many_programs_and_k_chunks(depth, batch_sizes, reverse):
    """Force several batch tiles, several unit tiles and several reduction chunks (masked tails)."""
    if ON_CUDA:
        with forced_config(TritonConfig(block_b=16, block_h=16, block_k=16)):
            check(torch.float32, 5, 20, 6, 40, depth, None, reverse)
    else:
        with forced_config(TritonConfig(block_b=2, block_h=16, block_k=16)):
            check(torch.float32, 5, 3, 6, 17, depth, batch_sizes, reverse)


# the per-step GEMMs by cuBLAS (torch.mm on CPU), the kernels reading their results: every mode,
# several tiles of every dimension, fp32 (dA is the GEMM operand) and fp16 (its fp16 copy is)
CUBLAS_CASES = [
    (torch.float32, 1, 17, PACKED, True, "both", None),
    (torch.float32, 2, 17, None, False, "both", None),
    (torch.float32, 3, 40, PACKED, True, "none", None),
    (torch.float32, 2, 17, None, True, "both", VARIANT_CASES["softsign cell, bias-free level"][0]),
    (torch.float16, 2, 40, PACKED, False, "both", None),
    (torch.float16, 3, 17, None, True, "none", None),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize(
    ("dtype", "depth", "hidden", "batch_sizes", "reverse", "biases", "acts"), CUBLAS_CASES
)
def test_cublas_gemms_match_naive(dtype, depth, hidden, batch_sizes, reverse, biases, acts):
    config = TritonConfig(block_b=2, block_h=16, block_k=16, cublas_gemms=True)
    if ON_CUDA:
        config = TritonConfig(cublas_gemms=True)
    with forced_config(config):
        check(dtype, 5, 3, 6, hidden, depth, batch_sizes, reverse, biases, activations=acts)


@cuda_only
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_bf16_matches_naive(depth):
    check(torch.bfloat16, 5, 3, 6, 17, depth, PACKED, depth == 2)


@cuda_only
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_graph_matches_naive(reverse, monkeypatch):
    monkeypatch.setattr(triton_graphs, "_GRAPHS", triton_graphs.OrderedDict())
    with forced_config(TritonConfig(cuda_graph=True)):
        for seed in (0, 1):  # the second call replays the cached graphs with new inputs
            check(torch.float32, 5, 3, 6, 17, 2, PACKED, reverse, seed=seed)
            assert len(triton_graphs._GRAPHS) == 2  # one forward, one backward graph


@cuda_only
def test_default_cuda_graphs_match_naive(monkeypatch):
    """auto: a direct run, a capture when the shapes repeat, then a replay; all exact."""
    monkeypatch.delenv("NESTRNN_TRITON_CUDA_GRAPH", raising=False)
    triton_loop.clear_cuda_graphs()
    for seed in (0, 1, 2):
        check(torch.float32, 5, 3, 6, 17, 2, PACKED, True, seed=seed)
    assert triton_loop.cuda_graph_count() == 2  # one forward, one backward graph


def test_chunked_sequence_equals_whole():
    """Returned state fed back in gives the whole-sequence result (truncated BPTT)."""
    x, weights, h0, c0 = in_float32(make_case(4, 2, 3, 8, 2))
    with torch.no_grad(), expect_triton_runs(forward=3, backward=0):
        y, h_n, c_n = triton_op(x, weights, h0, c0)
        y1, h1, c1 = triton_op(x[:2], weights, h0, c0)
        y2, h2, c2 = triton_op(x[2:], weights, h1, c1)
    torch.testing.assert_close(torch.cat([y1, y2]), y)
    torch.testing.assert_close(h2, h_n)
    torch.testing.assert_close(c2, c_n)


# --------------------------------------------------------------------- planning and fallback


@pytest.mark.parametrize("training", [False, True])
def test_plan_chooses_triton_where_it_runs(training):
    x = torch.zeros(3, 2, 4, device=DEVICE)
    activations = standard_activations(2)
    assert plan(x, None, False, activations, training, "triton").implementation == "triton"
    auto = plan(x, None, False, activations, training, "auto").implementation
    assert (auto == "triton") == ON_CUDA  # auto: Triton on CUDA only, never the interpreter


def test_mixed_dtypes_raise():
    x, weights, h0, c0 = make_case(2, 2, 3, 8, 1)
    mixed = [LevelWeights(*[p.float().to(DEVICE) for p in lw]) for lw in weights]
    with pytest.raises(ValueError, match="the input's dtype"):
        triton_op(x.half().to(DEVICE), mixed, h0.half().to(DEVICE), c0.half().to(DEVICE))


UNSUPPORTED = [torch.float64, *([torch.bfloat16] if INTERPRET else [])]


@pytest.mark.parametrize("dtype", UNSUPPORTED)
def test_unsupported_dtype_falls_back_with_one_warning(dtype, monkeypatch):
    """float64 (and bfloat16 under the interpreter): another implementation runs, warned once."""
    planning.forget_failures()
    case = make_case(5, 3, 4, 8, 2)
    with pytest.warns(RuntimeWarning) as caught, expect_triton_runs(forward=0, backward=0):
        bad = errors_vs_naive(dtype, case, PACKED, reverse=True)
        bad += errors_vs_naive(dtype, case)
    messages = [str(w.message) for w in caught if "backend 'triton' cannot run" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"input dtype {dtype}" in messages[0]
    assert not bad, "; ".join(bad)


def test_a_bug_in_the_driver_propagates_instead_of_falling_back(monkeypatch):
    """Only what compiling or launching a kernel raises makes the op fall back: an error of any
    other kind (here a TypeError in the step loop) reaches the caller, and Triton stays planned."""
    planning.forget_failures()

    def buggy(m, b):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(triton_loop, "_forward_loop", buggy)
    x, weights, h0, c0 = in_float32(make_case(3, 2, 3, 8, 2))
    with pytest.raises(TypeError, match="unsupported operand"):
        triton_op(x, weights, h0, c0)
    assert "triton" not in planning.failures()


def test_a_kernel_that_does_not_compile_falls_back_with_one_warning(monkeypatch):
    from triton.compiler.errors import CompilationError

    planning.forget_failures()

    def failing(m, b):
        raise CompilationError("", None, "unsupported layout on this GPU")

    monkeypatch.setattr(triton_loop, "_forward_loop", failing)
    case = make_case(3, 2, 3, 8, 2)
    try:
        with pytest.warns(RuntimeWarning, match="the triton implementation failed") as caught:
            bad = errors_vs_naive(torch.float32, case) + errors_vs_naive(torch.float32, case)
        assert len([w for w in caught if "implementation failed" in str(w.message)]) == 1
        assert "CompilationError" in planning.failures()["triton"]
        assert not bad, "; ".join(bad)
    finally:
        planning.forget_failures()


_NO_INTERPRETER_SCRIPT = r"""
import warnings
import torch
from nestrnn.ops.nested_lstm import LevelWeights, nested_lstm, nested_lstm_naive

torch.manual_seed(0)
T, B, H, D = 5, 3, 8, 2
weights = [LevelWeights(torch.randn(4 * H, H), torch.randn(4 * H, H), torch.randn(4 * H), None)
           for _ in range(D)]
x, h0, c0 = torch.randn(T, B, H), torch.randn(B, H), torch.randn(D, B, H)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runs = [nested_lstm(x, weights, h0, c0, backend="triton") for _ in range(2)]
messages = [str(w.message) for w in caught]
assert len(messages) == 1, messages
assert "backend 'triton' cannot run here (input on cpu)" in messages[0], messages
want = nested_lstm_naive(x, weights, h0, c0)
for got in runs:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("fell back once")
"""


def test_cpu_without_interpreter_falls_back_with_one_warning():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _NO_INTERPRETER_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "fell back once"


def test_importing_nestrnn_does_not_import_triton():
    code = (
        "import sys, importlib\n"
        "for name in ('nestrnn', 'nestrnn.ops', 'nestrnn.ops.nested_lstm'):\n"
        "    importlib.import_module(name)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------- CUDA graphs


class FakeGraphed:
    """A stand-in for a captured graph: a replay re-runs the step loop on the static buffers."""

    made: ClassVar[list[FakeGraphed]] = []

    def __init__(self, loop, launch, static):
        self.loop, self.launch, self.static = loop, launch, static
        loop(launch, static)  # warm-up run, as the real one does
        FakeGraphed.made.append(self)

    def __call__(self, inputs, fill=None):
        for name, value in inputs.items():
            self.static[name].copy_(value)
        if fill is not None:
            fill(self.static)
        self.loop(self.launch, self.static)
        return self.static


@pytest.fixture
def emulated_graphs(monkeypatch):
    """The CUDA-graph path on CPU: everything but the capture itself (that is ``cuda_only`` above
    and in ``benchmarks/gpu_check.py``). Yields the list of graphs made."""
    monkeypatch.setattr(FakeGraphed, "made", [])
    monkeypatch.setattr(triton_graphs, "_Graphed", FakeGraphed)
    monkeypatch.setattr(triton_graphs, "_capture_stream", lambda bufs: "stream")
    monkeypatch.setattr(triton_graphs, "_graph_budget", lambda device: 1 << 30)
    monkeypatch.setattr(triton_graphs, "_GRAPHS", triton_graphs.OrderedDict())
    monkeypatch.setattr(triton_graphs, "_SEEN", triton_graphs.OrderedDict())
    monkeypatch.setattr(triton_graphs, "_EVICTED", triton_graphs.OrderedDict())
    monkeypatch.setattr(triton_graphs, "_auto_failure", None)
    monkeypatch.delenv("NESTRNN_TRITON_CUDA_GRAPH", raising=False)
    return FakeGraphed.made


@pytest.mark.parametrize("cublas", [False, True])
def test_cuda_graph_buffer_logic_emulated(emulated_graphs, cublas):
    """Static buffers: copy in, fill, clone out, cache reuse across calls and directions."""
    with forced_config(TritonConfig(cuda_graph=True, cublas_gemms=cublas)):
        for seed in (0, 1):  # the second call reuses both cached "graphs" with new inputs
            check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed == 1, seed=seed)
            check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed == 1, seed=seed + 5)
    assert len(emulated_graphs) == 4  # forward + backward, for each direction


def test_cuda_graphs_by_default_once_shapes_repeat(emulated_graphs):
    """auto: the first call of a shape runs directly, the second captures, later ones replay."""
    for seed, graphs in ((0, 0), (1, 2), (2, 2), (3, 2)):
        check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed=seed)
        assert len(emulated_graphs) == graphs  # forward + backward
    check(torch.float32, 5, 3, 4, 8, 2, PACKED, seed=4)  # a new length: not captured at once
    assert len(emulated_graphs) == 2
    with mock.patch.dict(os.environ, {"NESTRNN_TRITON_CUDA_GRAPH": "0"}):
        for seed in (5, 6):
            check(torch.float32, 6, 3, 4, 8, 2, None, seed=seed)
    assert len(emulated_graphs) == 2


def test_graphs_and_direct_launches_take_their_own_configuration(emulated_graphs, monkeypatch):
    """A loop in a graph runs the graph configuration (here cuBLAS GEMMs), one launched directly
    the other (the fused kernels); both exact."""
    choose = triton_loop.pick_config

    def pick(batch, hidden, config=None, dtype=torch.float32, graphed=False):
        return choose(batch, hidden, TritonConfig(cublas_gemms=graphed), dtype, graphed)

    monkeypatch.setattr(triton_loop, "pick_config", pick)
    ran = []
    for name in ("_forward_loop", "_backward_loop"):
        loop = getattr(triton_loop, name)
        monkeypatch.setattr(
            triton_loop, name, lambda m, b, loop=loop: ran.append(m.cublas) or loop(m, b)
        )
    for seed in range(3):  # direct, capture (a warm-up run and a replay), replay
        check(torch.float32, 4, 3, 4, 8, 2, PACKED[:4], seed=seed)
    assert ran == [False, False, True, True, True, True, True, True]  # forward, backward each call
    assert all(graph.launch.cublas for graph in emulated_graphs)


def test_default_cuda_graphs_in_a_deep_bidirectional_layer(emulated_graphs):
    """Two layers, both directions, repeated calls: layers whose loops share a key (layer 1's input
    is 2H, like layer 0's here) share a graph, and every output and gradient stays exact."""
    from nestrnn import NestedLSTM

    torch.manual_seed(0)
    hidden = 8
    fast = NestedLSTM(2 * hidden, hidden, num_layers=2, bidirectional=True, backend="triton")
    slow = NestedLSTM(2 * hidden, hidden, num_layers=2, bidirectional=True, backend="naive")
    slow.load_state_dict(fast.state_dict())
    for _ in range(3):
        x = torch.randn(4, 3, 2 * hidden)
        results = []
        for model in (fast, slow):
            model.zero_grad()
            xs = x.clone().requires_grad_()
            out, (h, c) = model(xs)
            (out.sum() + h.square().sum() + c.sum()).backward()
            results.append([out, h, c, xs.grad, *(p.grad for p in model.parameters())])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # per direction a forward and a backward loop, shared by both layers: layer 1 repeats
        # layer 0's shapes, so they are captured in the first call and replayed from then on
        assert len(emulated_graphs) == 4


def test_auto_cuda_graphs_only_where_they_measured_faster(emulated_graphs, monkeypatch):
    monkeypatch.setattr(triton_graphs, "AUTO_GRAPH_MAX_BATCH_HIDDEN", 3 * 8 - 1)  # B * H = 24
    for seed in (0, 1, 2):
        check(torch.float32, 4, 3, 4, 8, 2, None, seed=seed)
    assert not emulated_graphs


def test_auto_cuda_graphs_keep_to_their_memory_budget(emulated_graphs, monkeypatch):
    """Graphs whose buffers would not fit are not made; older ones are evicted to make room."""
    monkeypatch.setattr(triton_graphs, "_graph_budget", lambda device: 1000)  # bytes: too few
    for seed in (0, 1):
        check(torch.float32, 4, 3, 4, 8, 2, None, seed=seed)
    assert not emulated_graphs
    monkeypatch.setattr(triton_graphs, "_graph_budget", lambda device: 1 << 30)
    with torch.no_grad():  # forward only: one graph a shape
        for steps in (2, 3, 2, 3):
            triton_op(*in_float32(make_case(steps, 3, 4, 8, 2)))
    assert len(triton_graphs._GRAPHS) == 2
    both = sum(triton_graphs._nbytes(g.static) for g in emulated_graphs)
    monkeypatch.setattr(triton_graphs, "_graph_budget", lambda device: both)
    with torch.no_grad():
        for _ in range(2):
            triton_op(*in_float32(make_case(4, 3, 4, 8, 2)))
    (graph,) = triton_graphs._GRAPHS.values()  # the new one, larger than either: both evicted
    assert graph is emulated_graphs[-1] and graph.launch.steps == 4
    made = len(emulated_graphs)
    with torch.no_grad():  # evicted loops run directly from then on: alternating does not thrash
        for steps in (2, 3, 4, 2, 3, 4):
            triton_op(*in_float32(make_case(steps, 3, 4, 8, 2)))
    assert len(emulated_graphs) == made and list(triton_graphs._GRAPHS.values()) == [graph]


def test_a_failed_automatic_capture_falls_back_with_one_warning(emulated_graphs, monkeypatch):
    def failing(loop, launch, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton_graphs, "_Graphed", failing)
    with pytest.warns(RuntimeWarning, match="capturing a CUDA graph failed") as caught:
        for seed in (0, 1, 2):
            check(torch.float32, 4, 3, 4, 8, 2, None, seed=seed)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert "triton" not in planning.failures()  # the kernels themselves still run


def test_gpu_launch_configurations_are_valid_at_every_size(monkeypatch):
    """What pick_config chooses on a GPU compiles there: power-of-two blocks of at least 16 (tl.dot),
    no block wider than 16 or the hidden size rounded up, cuBLAS GEMMs in every graph."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for batch in (1, 3, 16, 17, 32, 33, 64, 100, 256, 4096):
            for hidden in (1, 3, 17, 64, 256, 1000, 4096):
                for graphed in (False, True):
                    cfg = triton_loop.pick_config(batch, hidden, None, dtype, graphed)
                    widest = max(16, 1 << (hidden - 1).bit_length())
                    for block in (cfg.block_b, cfg.block_h, cfg.block_k):
                        assert block >= 16 and block & (block - 1) == 0, cfg
                    assert cfg.block_h <= widest and cfg.block_k <= widest, cfg
                    assert cfg.num_warps in (4, 8) and cfg.cublas_gemms in (False, True), cfg
                    assert cfg.cublas_gemms or not graphed, cfg


def test_a_bad_cuda_graph_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("NESTRNN_TRITON_CUDA_GRAPH", "yes")
    x, weights, h0, c0 = in_float32(make_case(2, 2, 3, 8, 2))
    with pytest.raises(
        ValueError, match="NESTRNN_TRITON_CUDA_GRAPH must be 1, 0 or auto, got 'yes'"
    ):
        triton_op(x, weights, h0, c0)
    assert "triton" not in planning.failures()


def test_no_graph_is_captured_off_cuda_or_inside_another_capture():
    bufs = {"gates": torch.zeros(2)}
    assert triton_graphs._capture_stream(bufs) is None  # a CPU tensor (the interpreter)


# ------------------------------------------------------------------ the real compiler, offline


def test_kernels_compile_for_sm90():
    """The real compiler (not the interpreter) turns every kernel into sm_90 code; no GPU needed.

    Catches what the interpreter lets through (dot sizes < 16, branch type mismatches, ...).
    ``benchmarks/compile_check.py --quick``: each dtype, depths 1 and 3, the paper's activations
    and two variants that put every activation in every role, biased and bias-free levels, GEMMs
    in the kernels and by cuBLAS (the latter with zoneout too, and with zoneout and layer
    normalisation in the whole-row configuration a call with LN runs).
    Skipped when this Triton build cannot compile for CUDA offline.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = REPO / "benchmarks" / "compile_check.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    lines = run.stdout.splitlines()
    if run.returncode == 3:
        pytest.skip(next(line for line in lines if line.startswith("SETUP")))
    failed = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed) or run.stderr[-3000:]
    # (2 + 6 + 6 + 6 cuBLAS + 6 cuBLAS with zoneout + 6 cuBLAS with zoneout and LN) x 3 dtypes
    assert sum(line.startswith("OK") for line in lines) == 96


# ----------------------------------------------------------------------------------- the layer


def test_layer_with_triton_backend_matches_generic_path():
    """The whole layer (2 layers, bidirectional, packed) through the kernels, as users run it."""
    from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

    from nestrnn import NestedLSTM

    torch.manual_seed(0)
    fused = NestedLSTM(
        3, 5, num_layers=2, bidirectional=True, memory="nested", backend="triton"
    ).to(DEVICE)
    generic = NestedLSTM(3, 5, num_layers=2, bidirectional=True, depth=2, backend="generic")
    generic.to(DEVICE).load_state_dict(fused.state_dict(), strict=True)  # same parameter names
    sequences = [torch.randn(n, 3, device=DEVICE) for n in (4, 2, 3)]
    results = []
    for layer, runs in ((fused, 4), (generic, 0)):  # 2 layers x 2 directions
        with expect_triton_runs(forward=runs, backward=runs):
            out, (h, c) = layer(pack_sequence(sequences, enforce_sorted=False))
            padded, _ = pad_packed_sequence(out)
            (padded.square().sum() + h.sum() + c.sum()).backward()
        results.append((padded, h, c, [p.grad.clone() for p in layer.parameters()]))
    for got, expected in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for got, expected in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
