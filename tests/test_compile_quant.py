"""torch.compile and torch.export with a projection (``proj_size``) above depth 1 and with a user
memory function, and dynamic int8 quantization: each against eager mode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_transforms import Leaky, close, outputs_and_grads

from nestrnn import NestedLSTM

LENGTHS = (3, 4, 5, 6, 7, 9, 11, 13, 17, 23)  # ten lengths: more than dynamo's 8 recompiles


def compiled_graphs(compiled, eager, lengths=LENGTHS) -> list[int]:
    """Run ``compiled`` and ``eager`` on every length, comparing outputs and gradients; the number
    of graphs dynamo has compiled after each length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for steps in lengths:
        x = torch.randn(steps, 2, 8)
        close(outputs_and_grads(compiled, x), outputs_and_grads(eager, x))
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


# ------------------------------------------------------------------------------ projection


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_compile_with_a_projection_compiles_at_most_twice_over_ten_lengths(fullgraph):
    """An unrolled time loop recompiled for every length and fell back to eager after eight."""
    torch.manual_seed(0)
    m = NestedLSTM(8, 16, 2, depth=2, proj_size=5, bidirectional=True)
    assert compiled_graphs(torch.compile(m, fullgraph=fullgraph), m)[-1] <= 2


@pytest.mark.slow
def test_compile_in_a_fresh_process_where_nestrnn_comes_before_inductor():
    """Inductor lists every CompositeImplicitAutograd op that exists when it is imported, the op's
    export decomposition included; imported after nestrnn (a user's script), torch.compile of an
    inference call or of a projected layer must still run the op whole."""
    code = (
        "import torch, nestrnn\n"
        "x = torch.randn(5, 3, 8)\n"
        "projected = nestrnn.NestedLSTM(8, 16, 1, depth=2, proj_size=5)\n"
        "out, _ = torch.compile(projected)(x)\n"
        "torch.testing.assert_close(out, projected(x)[0])\n"
        "with torch.no_grad():\n"
        "    plain = nestrnn.NestedLSTM(8, 16, 1, depth=2).eval()\n"
        "    torch.testing.assert_close(torch.compile(plain)(x)[0], plain(x)[0])\n"
        "print('compiled')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-2000:]


def test_compile_with_a_projection_and_a_user_memory_compiles_nothing_after_two_lengths():
    """The time loop is a graph break around the compiled step, as without a projection."""
    torch.manual_seed(0)
    m = NestedLSTM(8, 16, 1, memory=Leaky, proj_size=5)
    graphs = compiled_graphs(torch.compile(m), m, LENGTHS[:5])
    assert graphs[1] == graphs[-1]


@pytest.mark.parametrize("depth", [2, 3])
def test_export_with_a_projection_and_a_dynamic_length_equals_eager(depth):
    torch.manual_seed(depth)
    m = NestedLSTM(8, 16, 2, depth=depth, proj_size=5, bidirectional=True).eval()
    steps = torch.export.Dim("steps", min=2, max=64)
    program = torch.export.export(m, (torch.randn(5, 3, 8),), dynamic_shapes=({0: steps},))
    for length in (5, 9, 30):
        x = torch.randn(length, 3, 8)
        with torch.no_grad():
            close(program.module()(x), m(x))


def test_a_traced_projected_layer_runs_another_length_like_eager():
    """torch.jit.trace records the operator, not the steps of the length traced."""
    import warnings

    torch.manual_seed(2)
    m = NestedLSTM(8, 16, 2, depth=2, proj_size=5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, torch.randn(4, 2, 8))
    x = torch.randn(9, 2, 8)
    with torch.no_grad():
        close(traced(x), m(x))


def test_an_exported_projected_layer_differentiates_twice_as_in_eager():
    """A gradient penalty (create_graph=True) through the exported layer's operator."""
    torch.manual_seed(1)
    m = NestedLSTM(4, 6, 1, depth=2, proj_size=3, dtype=torch.float64).eval()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    steps = torch.export.Dim("steps", min=2, max=64)
    exported = torch.export.export(m, (x,), dynamic_shapes=({0: steps},)).module()

    def penalty(module, x):
        x = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(module(x)[0].square().sum(), x, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), list(module.parameters()))

    x = torch.randn(7, 2, 4, dtype=torch.float64)
    close(penalty(exported, x), penalty(m, x), atol=1e-9)


# ------------------------------------------------------------------------------ user memory


def test_fullgraph_compile_of_a_user_memory_says_what_is_supported():
    torch._dynamo.reset()
    m = NestedLSTM(8, 16, 1, memory=Leaky)
    with pytest.raises(RuntimeError) as caught:
        torch.compile(m, fullgraph=True)(torch.randn(3, 2, 8))
    message = str(caught.value)
    assert (
        "NestedLSTM with a user memory function cannot be compiled with fullgraph=True" in message
    )
    assert "use torch.compile without fullgraph" in message
    assert "file an issue" not in message


def test_onnx_export_of_a_projection_above_depth_one_runs_like_eager(tmp_path):
    """ONNX has no translation of the projected operator: the exporter records the steps."""
    import warnings

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    m = NestedLSTM(8, 16, 1, depth=2, proj_size=5).eval()
    x = torch.randn(4, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        close([torch.from_numpy(g) for g in got], m(x))


# ------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("spec", ["set", "dict"])
def test_dynamic_quantization_of_a_nested_lstm_warns_that_it_stays_float(spec):
    """quantize_dynamic(model, {NestedLSTM}) used to return the float layer without a word."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model = torch.nn.Sequential(NestedLSTM(8, 16, depth=2))
    qconfig_spec = {NestedLSTM} if spec == "set" else {NestedLSTM: default_dynamic_qconfig}
    with pytest.warns(UserWarning, match="NestedLSTM has no quantized version"):
        quantized = quantize_dynamic(model, qconfig_spec)
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        close(quantized(x), model(x))  # what it does run: the float layer


def test_a_nested_lstm_beside_quantized_modules_does_not_warn():
    import warnings

    from torch.ao.quantization import quantize_dynamic

    model = torch.nn.ModuleDict({"rnn": NestedLSTM(8, 16), "head": torch.nn.Linear(16, 4)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_dynamic(model)  # the default: nn.Linear and friends, not NestedLSTM
    assert not [w for w in caught if "NestedLSTM" in str(w.message)]
