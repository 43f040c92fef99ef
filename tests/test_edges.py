"""NestedLSTM and NestedLSTMCell where nn.LSTM and nn.LSTMCell work at the edges: an empty batch,
an empty sequence, ``torch.jit.trace`` in grad mode, the meta device and ``FakeTensorMode``, the
cell's argument positions, the exception types of a bad state, and second derivatives.

Depth 1 is compared with nn.LSTM itself, deeper models (and a user memory function) with the same
model on the step-by-step reference path (``backend="naive"``).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from helpers_memories import Leaky
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from nestrnn import MemoryFunction, NestedLSTM, NestedLSTMCell
from nestrnn.ops.nested_lstm import LevelWeights, nested_lstm, nested_lstm_naive

INPUT, HIDDEN = 3, 5

LAYOUTS = {
    "plain": {},
    "batch_first": {"batch_first": True},
    "bidirectional": {"bidirectional": True},
    "two_layers": {"num_layers": 2},
    "projected": {"proj_size": 3},
}


def gru(hidden_size: int) -> MemoryFunction:
    """The GRU memory of the example plugin: a user memory function with weights of its own."""
    return pytest.importorskip("nestrnn_gru").GRUMemory(hidden_size)


MEMORIES = {"depth2": {"depth": 2}, "depth3": {"depth": 3}, "leaky": {"memory": Leaky}}
MEMORIES["gru"] = {"memory": gru}


def nested(layout: str, memory: str, **kwargs) -> NestedLSTM:
    torch.manual_seed(0)
    return NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], **MEMORIES[memory], **kwargs)


def reference_of(model: NestedLSTM) -> NestedLSTM:
    """The same model on the step-by-step reference path."""
    kwargs = {k: getattr(model, k) for k in ("num_layers", "batch_first", "bidirectional")}
    reference = NestedLSTM(
        model.input_size,
        model.hidden_size,
        proj_size=model.proj_size,
        **kwargs,
        memory=model.memory_l0,
        backend="naive",
        dtype=model.weight_ih_l0.dtype,
    )
    reference.load_state_dict(model.state_dict())
    return reference


def lstm_and_nested(layout: str, dtype=torch.float64) -> tuple[nn.LSTM, NestedLSTM]:
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT, HIDDEN, **LAYOUTS[layout], dtype=dtype)
    model = NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], depth=1, dtype=dtype)
    model.load_state_dict(lstm.state_dict())
    return lstm, model


def sequence(module: nn.Module, steps: int, batch: int, dtype=torch.float64) -> torch.Tensor:
    shape = (batch, steps, INPUT) if module.batch_first else (steps, batch, INPUT)
    return torch.randn(shape, dtype=dtype)


def state_of(module: nn.Module, batch: int, depth: int, dtype=torch.float64):
    rows = module.num_layers * (2 if module.bidirectional else 1)
    h = torch.randn(rows, batch, module.proj_size or module.hidden_size, dtype=dtype)
    c = torch.randn(*((depth,) if depth > 1 else ()), rows, batch, module.hidden_size, dtype=dtype)
    return h, c


def run_and_differentiate(module: nn.Module, x: torch.Tensor, hx=None):
    """Outputs, then the gradients of x, of the given state and of every parameter."""
    leaves = [x, *(hx or ())]
    for t in leaves:
        t.requires_grad_(True)
    out, (h, c) = module(x, hx)
    loss = out.square().sum() + h.sum() + c.square().sum()
    wrt = [*leaves, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [out, h, c], [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------ empty batch


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_empty_batch_at_depth_1_is_nn_lstms(layout, given_state):
    lstm, model = lstm_and_nested(layout)
    x = sequence(lstm, 4, 0)
    hx = state_of(lstm, 0, 1) if given_state else None
    want = run_and_differentiate(lstm, x, hx)
    got = run_and_differentiate(model, x.detach().clone(), hx and tuple(t.detach() for t in hx))
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


@pytest.mark.parametrize("backend", ["auto", "generic", "naive"])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(layout, memory, backend):
    """At every depth, on every path: the state passes through, every gradient is zero."""
    model = nested(layout, memory, backend=backend, dtype=torch.float64)
    reference = reference_of(model)
    x = sequence(model, 4, 0)
    for hx in (None, state_of(model, 0, model.depth)):
        (out, h, c), grads = run_and_differentiate(model, x, hx)
        want, want_grads = run_and_differentiate(reference, x.detach().clone(), hx)
        assert_same([out, h, c], want)
        assert_same(grads, want_grads)
        assert out.shape == ((0, 4) if model.batch_first else (4, 0)) + (out.shape[-1],)
        assert all(not g.any() for g in grads)


@pytest.mark.parametrize("memory", ["depth1", *MEMORIES])
@pytest.mark.parametrize("layout", ["plain", "batch_first", "bidirectional"])
def test_an_empty_sequence_raises_nn_lstms_error(layout, memory):
    lstm, _ = lstm_and_nested(layout)
    model = lstm_and_nested(layout)[1] if memory == "depth1" else nested(layout, memory)
    model.double()
    for x in (sequence(lstm, 0, 2), torch.randn(0, INPUT, dtype=torch.float64)):
        with pytest.raises(RuntimeError) as lstm_error:
            lstm(x)
        with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
            model(x)
        assert str(lstm_error.value) == "Expected sequence length to be larger than 0 in RNN"


# ------------------------------------------------------------------------------ torch.jit.trace


def traced(module: nn.Module, example) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` in grad mode, with its default check of the trace."""
    assert torch.is_grad_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, example)


TRACED = ["plain", "batch_first", "bidirectional", "two_layers"]


@pytest.mark.parametrize("layout", [*TRACED, "projected"])
def test_trace_in_grad_mode_at_depth_1_passes_its_check_as_nn_lstm(layout):
    lstm, model = lstm_and_nested(layout)
    lstm.eval(), model.eval()
    example = sequence(model, 4, 2)
    traced_lstm, traced_model = traced(lstm, example), traced(model, example)
    x = sequence(model, 6, 2)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert_same(
                torch.utils._pytree.tree_leaves(traced_model(x)),
                torch.utils._pytree.tree_leaves(traced_lstm(x)),
            )


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("layout", TRACED)
def test_trace_in_grad_mode_passes_its_check_and_matches_eager(layout, depth):
    model = NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], depth=depth, dtype=torch.float64).eval()
    hx = state_of(model, 2, depth)
    plain, with_state = (
        traced(model, sequence(model, 4, 2)),
        traced(model, (sequence(model, 4, 2), hx)),
    )
    x, hx = sequence(model, 6, 2), state_of(model, 2, depth)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            flat = torch.utils._pytree.tree_leaves
            assert_same(flat(plain(x)), flat(model(x)))
            assert_same(flat(with_state(x, hx)), flat(model(x, hx)))
    # and it differentiates as eager mode does
    assert_same(
        run_and_differentiate(with_state, x, hx)[1],
        run_and_differentiate(model, x.detach(), tuple(t.detach() for t in hx))[1],
    )


# ------------------------------------------------------------------------------ shapes only


def real_outputs(model: NestedLSTM, dtype=torch.float32):
    x = sequence(model, 4, 2, dtype)
    out, (h, c) = model(x)
    return [out, h, c]


def assert_like(got, want, device: str) -> None:
    for g, w in zip(got, want):
        assert (g.shape, g.dtype, g.device.type) == (w.shape, w.dtype, device)


@pytest.mark.parametrize("memory", ["depth1", *MEMORIES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_model_on_the_meta_device_runs_forward_and_backward(layout, memory):
    spec = {"depth": 1} if memory == "depth1" else MEMORIES[memory]
    torch.manual_seed(0)
    meta = NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], **spec, device="meta")
    want = real_outputs(NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], **spec))
    x = torch.empty(sequence(meta, 4, 2).shape, device="meta")
    out, (h, c) = meta(x)
    assert_like([out, h, c], want, "meta")
    (out.sum() + h.sum() + c.sum()).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in meta.parameters())
    if memory == "depth1":
        lstm = nn.LSTM(INPUT, HIDDEN, **LAYOUTS[layout], device="meta")
        assert_like(torch.utils._pytree.tree_leaves(lstm(x)), [out, h, c], "meta")


@pytest.mark.parametrize("memory", ["depth1", *MEMORIES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_model_builds_and_runs_under_fake_tensor_mode(layout, memory):
    spec = {"depth": 1} if memory == "depth1" else MEMORIES[memory]
    want = real_outputs(NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], **spec))
    with FakeTensorMode():
        model = NestedLSTM(INPUT, HIDDEN, **LAYOUTS[layout], **spec)
        x = torch.empty(sequence(model, 4, 2).shape)
        out, (h, c) = model(x)
        (out.sum() + h.sum() + c.sum()).backward()
    assert_like([out, h, c], want, "cpu")
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


# ------------------------------------------------------------------------------ the cell


def test_the_cell_takes_nn_lstm_cells_arguments_in_their_positions():
    ours = inspect.signature(NestedLSTMCell).parameters
    theirs = inspect.signature(nn.LSTMCell).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(ours.values())[len(theirs) :])

    torch.manual_seed(0)
    lstm = nn.LSTMCell(INPUT, HIDDEN, False, "cpu", torch.float64)
    cell = NestedLSTMCell(INPUT, HIDDEN, False, "cpu", torch.float64, depth=1)
    cell.load_state_dict(lstm.state_dict(), strict=True)
    x, hx = torch.randn(2, INPUT, dtype=torch.float64), lstm(torch.randn(2, INPUT).double())
    assert_same(cell(x, hx), lstm(x, hx))
    deeper = NestedLSTMCell(INPUT, HIDDEN, True, "meta", torch.float64, depth=3)
    assert {(p.device.type, p.dtype) for p in deeper.parameters()} == {("meta", torch.float64)}
    with pytest.raises(TypeError):
        NestedLSTMCell(INPUT, HIDDEN, True, None, None, 2)  # depth is keyword-only


STATE_MISTAKES = {
    "one_tensor": lambda h, c: (h,),
    "three_tensors": lambda h, c: (h, c, c),
    "h_too_wide": lambda h, c: (torch.cat([h, h[..., :1]], -1), c),
    "c_too_wide": lambda h, c: (h, torch.cat([c, c[..., :1]], -1)),
    "other_batch": lambda h, c: (h[..., :1, :], c[..., :1, :]),
    "h_extra_axis": lambda h, c: (h.unsqueeze(0), c),
    "c_extra_axis": lambda h, c: (h, c.unsqueeze(0)),
    "h_scalar": lambda h, c: (h.new_tensor(0.0), c),
    "not_a_tuple": lambda h, c: h,
}


def error_type(call) -> type[BaseException]:
    try:
        call()
    except Exception as error:
        return type(error)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("mistake", STATE_MISTAKES)
def test_a_bad_cell_state_raises_nn_lstm_cells_exception_type(mistake, depth):
    lstm, cell = nn.LSTMCell(INPUT, HIDDEN), NestedLSTMCell(INPUT, HIDDEN, depth=depth)
    x, h = torch.randn(2, INPUT), torch.zeros(2, HIDDEN)
    c = torch.zeros(*((depth,) if depth > 1 else ()), 2, HIDDEN)
    expected = error_type(lambda: lstm(x, STATE_MISTAKES[mistake](h, torch.zeros(2, HIDDEN))))
    with pytest.raises(expected, match=r"hx|h_0|c_0"):
        cell(x, STATE_MISTAKES[mistake](h, c))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("mistake", sorted(set(STATE_MISTAKES) - {"one_tensor", "not_a_tuple"}))
def test_a_bad_layer_state_raises_nn_lstms_exception_type(mistake, depth):
    """(nn.LSTM answers a state that is not a pair with an IndexError from its internals; ours
    are the cell's: TypeError for no tuple, RuntimeError for a tuple of another length.)"""
    lstm, model = nn.LSTM(INPUT, HIDDEN), NestedLSTM(INPUT, HIDDEN, depth=depth)
    x = torch.randn(4, 2, INPUT)
    h, c = state_of(lstm, 2, 1, torch.float32)
    expected = error_type(lambda: lstm(x, STATE_MISTAKES[mistake](h, c)))
    with pytest.raises(expected, match=r"hx|h_0|c_0"):
        model(x, STATE_MISTAKES[mistake](h, state_of(model, 2, depth, torch.float32)[1]))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        model(x, h)
    with pytest.raises(RuntimeError, match="hx must be a tuple"):
        model(x, (h,))


# ------------------------------------------------------------------------------ double backward


def op_case(depth: int, packed: bool):
    """A tiny float64 case of the op: its differentiable arguments and a function of them."""
    torch.manual_seed(depth)
    steps, batch, features, hidden = 3, 2, 2, 2
    shapes = [(4 * hidden, features), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    flat = [
        torch.randn(*((4 * hidden, hidden) if k and n == 0 else shape), dtype=torch.float64)
        for k in range(depth)
        for n, shape in enumerate(shapes)
    ]
    x = torch.randn(steps, batch, features, dtype=torch.float64)
    h0, c0 = torch.randn(batch, hidden).double(), torch.randn(depth, batch, hidden).double()
    batch_sizes = torch.tensor([2, 2, 1]) if packed else None
    args = [t.requires_grad_() for t in (x, h0, c0, *flat)]
    return args, batch_sizes


@pytest.mark.parametrize(
    ("reverse", "packed"), [(False, False), (True, True)], ids=["forward", "reverse_packed"]
)
@pytest.mark.parametrize("depth", [2, 3])
def test_the_op_has_exact_second_derivatives(depth, reverse, packed):
    args, batch_sizes = op_case(depth, packed)

    def op(reference: bool):
        def run(x, h0, c0, *flat):
            weights = [LevelWeights(*flat[n : n + 4]) for n in range(0, len(flat), 4)]
            if reference:
                return nested_lstm_naive(x, weights, h0, c0, batch_sizes, reverse)
            return nested_lstm(x, weights, h0, c0, batch_sizes, reverse)

        return run

    assert torch.autograd.gradcheck(op(False), args, fast_mode=True)
    assert torch.autograd.gradgradcheck(op(False), args, fast_mode=True)
    # the same second derivatives as the reference's, through a gradient penalty
    penalties = []
    for reference in (False, True):
        out, h_n, c_n = op(reference)(*args)
        first = torch.autograd.grad(
            out.sum() + h_n.sum() + c_n.square().sum(), args, create_graph=True
        )
        penalties.append(torch.autograd.grad(sum(g.square().sum() for g in first), args))
    assert_same(*penalties)


@pytest.mark.parametrize("memory", ["depth2", "depth3"])
@pytest.mark.parametrize("layout", ["plain", "bidirectional", "two_layers"])
def test_a_gradient_penalty_trains_as_on_the_reference(layout, memory):
    model = nested(layout, memory, dtype=torch.float64)
    reference = reference_of(model)
    x = sequence(model, 4, 2)
    grads = []
    for module in (model, reference):
        x_leaf = x.clone().requires_grad_()
        out, _ = module(x_leaf)
        (dx,) = torch.autograd.grad(out.sum(), x_leaf, create_graph=True)
        module.zero_grad()
        dx.square().sum().backward()
        grads.append([p.grad for p in module.parameters()])
    assert_same(*grads)
