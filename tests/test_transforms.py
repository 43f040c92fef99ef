"""NestedLSTM in the rest of PyTorch 2: torch.compile, torch.export, ONNX, tracing, autocast,
torch.func and ``torch.load(weights_only=True)``, each at depth 1 and 2 against eager mode; and
PyTorch's own nn.LSTM test inputs (``torch.testing._internal.common_modules``).

Nothing here may give a result that differs from eager: where a transform cannot record the model
correctly, it must raise a clear error.
"""

from __future__ import annotations

import itertools
import pickle
import warnings

import pytest
import torch
from helpers_memories import Leaky
from torch import nn

import nestrnn
from nestrnn import NestedLSTM

DEPTHS = [1, 2]


def model(depth: int, **kwargs) -> NestedLSTM:
    torch.manual_seed(depth)
    return NestedLSTM(8, 16, 2, depth=depth, **kwargs)


def close(got, want, atol=1e-5):
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol)


def outputs_and_grads(m: nn.Module, x: torch.Tensor):
    out, (h, c) = m(x)
    (out.square().sum() + h.sum() + c.square().sum()).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    return [out, h, c], grads


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("depth", DEPTHS)
def test_compile_fullgraph_trains_like_eager(depth):
    m = model(depth, bidirectional=True)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(5, 3, 8)
    close(outputs_and_grads(compiled, x), outputs_and_grads(m, x))
    x = torch.randn(7, 3, 8)  # another length: no wrong result from a stale graph
    close(outputs_and_grads(compiled, x), outputs_and_grads(m, x))


def test_compile_with_a_custom_memory_compiles_once_for_every_length():
    """The time loop is not unrolled: no compilation per sequence length, no silent fallback."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = NestedLSTM(8, 16, 1, memory=Leaky)
    compiled = torch.compile(m)
    graphs = None
    for n, steps in enumerate((3, 5, 7, 11, 17, 29, 40, 64)):
        x = torch.randn(steps, 2, 8)
        close(outputs_and_grads(compiled, x), outputs_and_grads(m, x))
        if n == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # none for the six later lengths


# ------------------------------------------------------------------------------ torch.export


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_export_equals_eager_on_a_new_input(depth):
    m = model(depth, bidirectional=True).eval()
    steps = torch.export.Dim("steps", min=2, max=64)
    program = torch.export.export(m, (torch.randn(5, 3, 8),), dynamic_shapes=({0: steps},))
    for length in (5, 9):
        x = torch.randn(length, 3, 8)
        with torch.no_grad():
            close(program.module()(x), m(x))


def test_export_with_a_custom_memory_equals_eager():
    m = NestedLSTM(8, 16, 1, memory=Leaky).eval()
    program = torch.export.export(m, (torch.randn(5, 3, 8),))
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        close(program.module()(x), m(x))


# ------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize("depth", DEPTHS)
def test_onnx_export_runs_in_onnxruntime_like_eager(tmp_path, depth):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = model(depth, bidirectional=True).eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            m,
            (torch.randn(6, 3, 8),),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    x = torch.randn(6, 3, 8)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, (h, c) = m(x)
    close([torch.from_numpy(g) for g in got], [out, h, c])


@pytest.mark.parametrize("depth", DEPTHS)
def test_legacy_onnx_export_is_a_clear_error(tmp_path, depth):
    """The TorchScript-based exporter cannot translate the op: it says so (never a
    constant-folded graph)."""
    pytest.importorskip("onnx")
    with pytest.raises(Exception, match="nestrnn::nested_lstm"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model(depth).eval(), (torch.randn(5, 3, 8),), str(tmp_path / "m.onnx"), dynamo=False
        )


# ------------------------------------------------------------------------------ tracing


@pytest.mark.parametrize("depth", DEPTHS)
def test_trace_records_the_op_and_runs_new_inputs(depth):
    m = model(depth).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, torch.randn(5, 3, 8))
    assert "nestrnn::nested_lstm" in str(traced.graph)
    for shape in ((5, 3, 8), (9, 3, 8)):
        x = torch.randn(*shape)
        with torch.no_grad():
            close(traced(x), m(x))


def test_trace_of_a_custom_memory_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record Leaky's time loop"):
        torch.jit.trace(NestedLSTM(8, 16, memory=Leaky), torch.randn(5, 3, 8))


# ------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("depth", DEPTHS)
def test_autocast_computes_and_returns_the_autocast_dtype(depth):
    """bfloat16 out under CPU autocast; fp32 parameters get fp32 gradients."""
    m = model(depth)
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == h.dtype == c.dtype == torch.bfloat16
    # the same as the model run on bfloat16-rounded inputs and weights
    rounded = model(depth).to(torch.bfloat16)
    with torch.no_grad():
        want = rounded(x.bfloat16())
    close([out.detach(), h.detach(), c.detach()], [want[0], *want[1]], atol=2e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("depth", DEPTHS)
def test_autocast_returns_what_nn_lstm_returns(depth):
    """The same dtypes as nn.LSTM under CPU autocast, where this CPU can run nn.LSTM there.

    nn.LSTM under CPU autocast runs oneDNN's LSTM, which has no bfloat16 kernel on CPUs without
    avx512_bf16 (an AVX2-only AMD EPYC, say); whether it runs is found out by running it.
    """
    x = torch.randn(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            want_out, (want_h, want_c) = nn.LSTM(8, 16, 2)(x)
        except RuntimeError as error:
            pytest.skip(f"nn.LSTM cannot run bfloat16 autocast here: {str(error).split('.')[0]}")
        out, (h, c) = model(depth)(x)
    assert (out.dtype, h.dtype) == (want_out.dtype, want_h.dtype) == (torch.bfloat16,) * 2
    assert c.dtype == want_c.dtype


# ------------------------------------------------------------------------------ torch.func


@pytest.mark.parametrize("depth", DEPTHS)
def test_func_grad_equals_autograd(depth):
    m = model(depth).double()
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    params = dict(m.named_parameters())

    def loss(p):
        out, (h, c) = torch.func.functional_call(m, p, (x,))
        return out.square().sum() + c.sum()

    got = torch.func.grad(loss)(params)
    loss(params).backward()
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.grad, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------ weights_only


@pytest.mark.parametrize(("depth", "memory"), [(1, None), (2, None), (None, Leaky)])
def test_a_pickled_model_loads_with_weights_only(tmp_path, depth, memory):
    m = NestedLSTM(8, 16, 2, depth=depth, memory=memory, bidirectional=True).eval()
    torch.save(m, tmp_path / "model.pt")
    with pytest.raises(Exception, match="weights_only"):
        torch.load(tmp_path / "model.pt", weights_only=True)  # refused until allowlisted
    extra = [Leaky] if memory else []
    with torch.serialization.safe_globals(nestrnn.safe_globals(*extra)):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        close(loaded(x), m(x), atol=0)


# ------------------------------------------------------------------------------ nn.LSTM's tests


def lstm_module_inputs():
    """PyTorch's own nn.LSTM samples, inputs requiring grad, for both dtypes and modes."""
    common = pytest.importorskip("torch.testing._internal.common_modules")
    info = next(m for m in common.module_db if m.module_cls is nn.LSTM)
    cases = []
    for dtype, training in itertools.product((torch.float32, torch.float64), (False, True)):
        for sample in common.module_inputs_torch_nn_LSTM(info, "cpu", dtype, True, training):
            cases.append((sample, dtype, training))
    return info, cases


def run_lstm_sample(module: nn.Module, sample, training: bool):
    module.train(training)
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    out, (h, c) = module(*args, **kwargs)
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if t.requires_grad]
    wrt = [*module.parameters(), *inputs]
    loss = out.square().sum() + h.sum() + c.square().sum()
    return [out, h, c], torch.autograd.grad(loss, wrt, allow_unused=True)


def test_nn_lstm_module_inputs_at_depth_one_equal_nn_lstm():
    """All of module_db's LSTM samples (128: 32 configurations x 2 dtypes x training or not)
    through NestedLSTM(depth=1) loaded with nn.LSTM's state dict: outputs, states and every
    gradient equal."""
    _, cases = lstm_module_inputs()
    assert len(cases) == 128
    for sample, dtype, training in cases:
        kwargs = sample.constructor_input.kwargs
        torch.manual_seed(0)
        lstm = nn.LSTM(**kwargs, dtype=dtype)
        ours = NestedLSTM(**kwargs, dtype=dtype, depth=1)
        ours.load_state_dict(lstm.state_dict(), strict=True)
        atol = 1e-10 if dtype == torch.float64 else 1e-4
        want_out, want_grads = run_lstm_sample(lstm, sample, training)
        got_out, got_grads = run_lstm_sample(ours, sample, training)
        close(got_out, want_out, atol=atol)
        for g, w in zip(got_grads, want_grads):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, atol=atol, rtol=atol)


def test_nn_lstm_module_inputs_at_depth_two_run():
    """The same samples at depth 2 (a given c_0 gets one cell per level): right shapes."""
    _, cases = lstm_module_inputs()
    for sample, dtype, training in cases[::4]:
        kwargs = sample.constructor_input.kwargs
        ours = NestedLSTM(**kwargs, dtype=dtype, depth=2).train(training)
        args = list(sample.forward_input.args)
        if len(args) == 2:  # nested state: c_0 repeated for each of the two levels
            h0, c0 = args[1]
            args[1] = (h0, torch.stack([c0, c0]))
        out, (h, c) = ours(*args)
        hidden = kwargs["proj_size"] or kwargs["hidden_size"]
        directions = 2 if kwargs["bidirectional"] else 1
        assert out.shape[-1] == directions * hidden and h.shape[-1] == hidden
        assert c.shape[0] == 2 and c.shape[-1] == kwargs["hidden_size"]


def with_nested_state(args: tuple, depth: int) -> tuple:
    """A sample's arguments for ``depth`` levels: a given c_0 gets a leading depth axis."""
    if len(args) < 2 or depth == 1:
        return args
    h0, c0 = args[1]
    return (args[0], (h0, c0.expand(depth, *c0.shape)), *args[2:])


@pytest.mark.parametrize("depth", DEPTHS)
def test_nn_lstm_module_inputs_pass_pytorchs_module_checks(depth):
    """test_modules.py's checks of module_db's LSTM entry, on every third float64 sample:
    forward equal to a reference (nn.LSTM at depth 1, backend="naive" at depth 2), repr, a pickle
    round trip, gradcheck with batched gradients and gradgradcheck over the inputs and the
    parameters."""
    _, cases = lstm_module_inputs()
    samples = [s for s, dtype, training in cases if dtype == torch.float64 and training][::3]
    assert len(samples) == 11
    for sample in samples:
        kwargs = sample.constructor_input.kwargs
        torch.manual_seed(0)
        m = NestedLSTM(**kwargs, dtype=torch.float64, depth=depth)
        if depth == 1:
            reference = nn.LSTM(**kwargs, dtype=torch.float64)
        else:
            reference = NestedLSTM(**kwargs, dtype=torch.float64, depth=depth, backend="naive")
        reference.load_state_dict(m.state_dict(), strict=True)
        args = sample.forward_input.args
        close(m(*with_nested_state(args, depth)), reference(*with_nested_state(args, depth)), 1e-10)
        assert repr(m).startswith("NestedLSTM(")
        loaded = pickle.loads(pickle.dumps(m))
        assert repr(loaded) == repr(m)
        close(loaded(*with_nested_state(args, depth)), m(*with_nested_state(args, depth)), 0)

        # as test_modules.py's test_grad: the inputs and the parameters, flattened
        flat, spec = torch.utils._pytree.tree_flatten((args, *m.parameters()))
        n_params = len(list(m.parameters()))

        def run(*flat_inputs, spec=spec, n_params=n_params, m=m):
            inputs = torch.utils._pytree.tree_unflatten(flat_inputs, spec)[:-n_params]
            return torch.utils._pytree.tree_leaves(m(*with_nested_state(inputs[0], depth)))

        assert torch.autograd.gradcheck(run, flat, check_batched_grad=True, fast_mode=True)
        assert torch.autograd.gradgradcheck(run, flat, fast_mode=True)


def test_nn_lstm_error_inputs_raise_the_same_exception_types():
    common = pytest.importorskip("torch.testing._internal.common_modules")
    info = next(m for m in common.module_db if m.module_cls is nn.LSTM)
    samples = info.module_error_inputs_func(info, "cpu", torch.float32, False, False)
    assert samples
    for sample in samples:
        inputs = sample.module_error_input
        construct = inputs.constructor_input
        error = sample.error_type
        if sample.error_on == common.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error):
                NestedLSTM(*construct.args, **construct.kwargs)
        else:
            m = NestedLSTM(*construct.args, **construct.kwargs)
            with pytest.raises(error):
                m(*inputs.forward_input.args, **inputs.forward_input.kwargs)
