"""The fast outer LSTM around any memory function (``ops/outer_lstm/stepwise.py``) against the naive
per-step path: outputs, final states and every gradient (x, h0, c0, outer weights and the memory
function's parameters), in float64, with its native step nodes and with its Python ones."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from helpers_memories import Leaky
from helpers_native import require
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nestrnn import MemoryFunction
from nestrnn.memory import NestedMemory
from nestrnn.ops.common import native
from nestrnn.ops.nested_lstm import LevelWeights
from nestrnn.ops.outer_lstm import native_nodes, outer_lstm, outer_lstm_naive, stepwise


@pytest.fixture(autouse=True)
def _kernel() -> None:
    """The fast path runs on the CPU kernel (helpers_native: a failure where it must build)."""
    require(native.status(), "CPU kernel")


class Decaying(MemoryFunction):
    """A memory with a state of its own and an unusual outer candidate activation."""

    num_states = 1
    outer_candidate_activation = "softsign"

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.rate = nn.Parameter(torch.rand(hidden_size))

    def forward(self, gated_cell, gated_input, state):
        trace = self.rate * state[0] + torch.tanh(gated_input)
        return gated_cell + 0.5 * trace, (trace,)


class IgnoresInput(MemoryFunction):
    """Uses f * c only: autograd passes no gradient for i * g."""

    def forward(self, gated_cell, gated_input, state):
        return 0.9 * gated_cell, ()


class Detaching(MemoryFunction):
    """Cuts the graph through its inputs: the gradient reaches the outer gates of earlier steps
    (through h) only along the chain of the outer LSTM's own nodes."""

    def __init__(self, hidden_size):
        super().__init__(hidden_size)
        self.scale = nn.Parameter(torch.rand(hidden_size))

    def forward(self, gated_cell, gated_input, state):
        return self.scale * gated_cell.detach() + gated_input.detach(), ()


MEMORIES = {
    "leaky": Leaky,
    "decaying": Decaying,
    "ignores_input": IgnoresInput,
    "detaching": Detaching,
    "nested": lambda h: NestedMemory(h, depth=3, cell_activation="softsign"),
}


NODES = ["native", "none"]


@pytest.fixture(autouse=True)
def uninitialized_memory_is_nan():
    """torch.empty fills its memory with NaN here: a kernel that reads memory nobody wrote (or
    memory already freed, and handed out again) gives NaN, not a lucky zero."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def step_nodes(kind: str, fuse_input: bool = True):
    """Run the stepwise path with its native (C++) step nodes or without them (as where they
    cannot be built: every step through the gates node and autograd), and x's
    projection and gradient in the steps' GEMMs (as at small sizes) or in the prologue's (as at
    large)."""
    with mock.patch.object(stepwise, "fuses_input", lambda _weight: fuse_input):
        if kind == "none":
            with mock.patch.object(native_nodes, "module", lambda: None):
                yield
            return
        require(native_nodes.status(), "native step nodes")
        yield


def test_each_kind_of_step_node_runs():
    memory, weights, x, h0, c0 = case("leaky", 3, 2, 2, 4, True, 0)
    for kind, name in (("native", "CppNode"), ("none", "MulBackward0")):
        with step_nodes(kind):
            _, h_n, _ = stepwise.outer_lstm_stepwise(
                x, weights, memory, h0, c0, None, False, "tanh"
            )
        assert name in h_n.grad_fn.name()


def case(memory_name, steps, batch, inputs, hidden, bias, seed):
    torch.manual_seed(seed)
    memory = MEMORIES[memory_name](hidden).double()

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    weights = LevelWeights(
        rand(4 * hidden, inputs),
        rand(4 * hidden, hidden),
        rand(4 * hidden) if bias else None,
        rand(4 * hidden) if bias else None,
    )
    x, h0 = rand(steps, batch, inputs), rand(batch, hidden)
    c0 = rand(1 + memory.num_states, batch, hidden)
    return memory, weights, x, h0, c0


def run(fn, memory, weights, x, h0, c0, batch_sizes, reverse, seed=1):
    out, h_n, c_n = fn(
        x, weights, memory, h0, c0, batch_sizes, reverse, memory.outer_candidate_activation
    )
    gen = torch.Generator().manual_seed(seed)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (out, h_n, c_n)
    )
    leaves = [x, h0, c0, *(w for w in weights if w is not None), *memory.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # no row may be active at all
    return [
        out,
        h_n,
        c_n,
        *(torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)),
    ]


@pytest.mark.parametrize("nodes", NODES)
@settings(deadline=None, max_examples=40)
@given(
    memory=st.sampled_from(sorted(MEMORIES)),
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    inputs=st.integers(1, 4),
    hidden=st.integers(1, 5),
    bias=st.booleans(),
    packed=st.booleans(),
    reverse=st.booleans(),
    fuse_input=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_matches_the_naive_path(
    nodes, memory, steps, batch, inputs, hidden, bias, packed, reverse, fuse_input, seed, data
):
    memory, weights, x, h0, c0 = case(memory, steps, batch, inputs, hidden, bias, seed)
    batch_sizes = None
    if packed:
        sizes = sorted(data.draw(st.lists(st.integers(0, batch), min_size=steps, max_size=steps)))
        batch_sizes = torch.tensor(sizes[::-1])
    assert stepwise.applies(x, weights, h0, c0)
    with step_nodes(nodes, fuse_input):
        got = run(stepwise.outer_lstm_stepwise, memory, weights, x, h0, c0, batch_sizes, reverse)
    want = run(outer_lstm_naive, memory, weights, x, h0, c0, batch_sizes, reverse)
    for n, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(
            g, w, atol=1e-10, rtol=1e-10, msg=lambda m, n=n: f"item {n}: {m}"
        )


def test_an_empty_sequence_matches_the_naive_path():
    """T = 0, as the whole-sequence op allows: no output, the state passes through."""
    memory, weights, x, h0, c0 = case("leaky", 0, 2, 3, 4, True, 0)
    got = run(stepwise.outer_lstm_stepwise, memory, weights, x, h0, c0, None, False)
    want = run(outer_lstm_naive, memory, weights, x, h0, c0, None, False)
    assert got[0].shape == (0, 2, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("nodes", NODES)
def test_retained_graph_and_partial_losses(nodes):
    """A second backward through the same graph, reaching fewer steps, gives the right gradients
    (the steps it does not reach contribute nothing)."""
    memory, weights, x, h0, c0 = case("decaying", 6, 3, 2, 4, True, 0)
    args = (x, weights, memory, h0, c0, None, False, "softsign")
    with step_nodes(nodes):
        out, _, _ = stepwise.outer_lstm_stepwise(*args)
    full = torch.autograd.grad(out.sum(), weights.weight_hh, retain_graph=True)[0]
    first_only = torch.autograd.grad(out[0].sum(), weights.weight_hh)[0]
    ref_out, _, _ = outer_lstm_naive(*args)
    torch.testing.assert_close(full, torch.autograd.grad(ref_out.sum(), weights.weight_hh)[0])
    ref_out, _, _ = outer_lstm_naive(*args)
    ref_first = torch.autograd.grad(ref_out[0].sum(), weights.weight_hh)[0]
    torch.testing.assert_close(first_only, ref_first)


def partial_loss(out, h_n, c_n, used):
    """A loss of the steps' outputs in ``used`` (step numbers; "h", "c": the final states)."""
    terms = [out[t] for t in used if isinstance(t, int)]
    terms += [s for name, s in (("h", h_n), ("c", c_n)) if name in used]
    return sum(
        (t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view(t.shape)).sum() for t in terms
    )


@pytest.mark.parametrize("nodes", NODES)
@settings(deadline=None, max_examples=40)
@given(
    memory=st.sampled_from(sorted(MEMORIES)),
    steps=st.integers(1, 5),
    packed=st.booleans(),
    reverse=st.booleans(),
    fuse_input=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_losses_of_some_outputs_through_a_retained_graph(
    nodes, memory, steps, packed, reverse, fuse_input, seed, data
):
    """Losses that use only some outputs (so that some steps' nodes never run their backward),
    one after another through the same retained graph: every gradient as the naive path's."""
    memory, weights, x, h0, c0 = case(memory, steps, 3, 2, 4, True, seed)
    batch_sizes = torch.tensor([3] + [2] * (steps - 1)) if packed else None
    args = (x, weights, memory, h0, c0, batch_sizes, reverse, memory.outer_candidate_activation)
    leaves = [x, h0, c0, *(w for w in weights if w is not None), *memory.parameters()]
    outputs = [*range(steps), "h", "c"]
    with step_nodes(nodes, fuse_input):
        fast = stepwise.outer_lstm_stepwise(*args)
    for _ in range(2):
        used = data.draw(st.lists(st.sampled_from(outputs), min_size=1, unique=True))
        got = torch.autograd.grad(
            partial_loss(*fast, used), leaves, retain_graph=True, allow_unused=True
        )
        want = torch.autograd.grad(
            partial_loss(*outer_lstm_naive(*args), used), leaves, allow_unused=True
        )
        for n, (g, w, leaf) in enumerate(zip(got, want, leaves)):
            g = torch.zeros_like(leaf) if g is None else g
            w = torch.zeros_like(leaf) if w is None else w
            torch.testing.assert_close(g, w, msg=lambda m, n=n, used=used: f"{used} {n}: {m}")


@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("fuse_input", [True, False])
def test_a_gradient_returned_stays_as_it_was(nodes, fuse_input):
    """The steps write x's gradient into a buffer of the sequence: a second backward through the
    retained graph writes a new one, never the one the first returned."""
    memory, weights, x, h0, c0 = case("leaky", 4, 3, 2, 4, True, 0)
    with step_nodes(nodes, fuse_input):
        out, _, _ = stepwise.outer_lstm_stepwise(x, weights, memory, h0, c0, None, False, "tanh")
    first = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    kept = first.clone()
    second = torch.autograd.grad((2 * out).sum(), x)[0]
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(second, 2 * kept)


@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("needs", ["weights only", "no input", "no bias", "one bias"])
def test_inputs_and_biases_that_need_no_gradient(nodes, needs):
    """The steps skip x's and the bias's gradients where nothing needs them; the others are as
    the naive path's."""
    memory, weights, x, h0, c0 = case("decaying", 5, 3, 2, 4, True, 1)
    frozen = {
        "weights only": [x, h0, c0, weights.bias_ih, weights.bias_hh],
        "no input": [x],
        "no bias": [weights.bias_ih, weights.bias_hh],
        "one bias": [weights.bias_hh],
    }[needs]
    for tensor in frozen:
        tensor.requires_grad_(False)
    leaves = [t for t in (x, h0, c0, *weights, *memory.parameters()) if t.requires_grad]
    args = (x, weights, memory, h0, c0, None, True, memory.outer_candidate_activation)
    with step_nodes(nodes):
        fast = stepwise.outer_lstm_stepwise(*args)
    got = torch.autograd.grad(partial_loss(*fast, [0, 3, "h", "c"]), leaves)
    want = torch.autograd.grad(partial_loss(*outer_lstm_naive(*args), [0, 3, "h", "c"]), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_the_steps_take_the_input_only_while_the_weights_are_small(monkeypatch):
    """[W_ih | W_hh] in at most a quarter of the L2 cache (see ``fuses_input``)."""
    monkeypatch.setattr(stepwise, "L2_CACHE_BYTES", 1 << 20)
    assert stepwise.fuses_input(torch.empty(300, 75))  # 180 KB
    assert not stepwise.fuses_input(torch.empty(400, 100))  # 320 KB
    assert not stepwise.fuses_input(torch.empty(300, 75, dtype=torch.float64))  # 360 KB
    monkeypatch.setattr(stepwise, "L2_CACHE_BYTES", 2 << 20)
    assert stepwise.fuses_input(torch.empty(400, 100))


@pytest.mark.parametrize("nodes", NODES)
def test_a_second_derivative_is_a_clear_error(nodes):
    """The outer LSTM's nodes compute their backward by hand: a graph through it would be wrong."""
    memory, weights, x, h0, c0 = case("leaky", 3, 2, 2, 4, True, 0)
    with step_nodes(nodes):
        out, _, _ = stepwise.outer_lstm_stepwise(x, weights, memory, h0, c0, None, False, "tanh")
    with pytest.raises(RuntimeError, match="no second derivative|differentiate twice"):
        (grad,) = torch.autograd.grad((out**2).sum(), weights.weight_hh, create_graph=True)
        torch.autograd.grad(grad.sum(), weights.weight_hh)


def test_a_memory_function_returning_the_wrong_shape_is_a_clear_error():
    class Wrong(MemoryFunction):
        def forward(self, gated_cell, gated_input, state):
            return torch.cat([gated_cell, gated_input], dim=1), ()

    memory, weights, x, h0, c0 = case("leaky", 3, 2, 2, 4, True, 0)
    with pytest.raises(RuntimeError, match=r"Wrong returned a cell of shape \(2, 8\)"):
        outer_lstm(x, weights, Wrong(4).double(), h0, c0)


def test_other_dtypes_and_autocast_run_the_naive_path():
    memory, weights, x, h0, c0 = case("leaky", 3, 2, 2, 4, True, 0)
    half = [t.detach().bfloat16() for t in (x, h0, c0)]
    assert not stepwise.applies(half[0], LevelWeights(*(w.bfloat16() for w in weights)), *half[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stepwise.applies(x, weights, h0, c0)
        out, _, _ = outer_lstm(
            x.float(),
            LevelWeights(*(w.float() for w in weights)),
            memory.float(),
            h0.float(),
            c0.float(),
        )
    assert out.dtype == torch.bfloat16
