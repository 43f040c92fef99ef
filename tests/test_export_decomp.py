"""Exported programs decompose NestedLSTM into core ATen ops: ``run_decompositions()`` with no
argument, and ``torch.onnx.export(dynamo=True)`` with no translation table, both computing what
eager mode computes, for a static and a dynamic sequence length."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch

from nestrnn import NestedLSTM

CASES = {
    "depth1": dict(depth=1),
    "depth2": dict(depth=2),
    "depth3": dict(depth=3),
    "bidirectional": dict(depth=2, bidirectional=True),
    "two-layers": dict(depth=2, num_layers=2),
    "proj": dict(depth=2, proj_size=4),
}


def model(dtype=torch.float32, **kwargs) -> NestedLSTM:
    torch.manual_seed(0)
    kwargs.setdefault("num_layers", 1)
    return NestedLSTM(8, 16, **kwargs).to(dtype).eval()


def targets(module: torch.fx.GraphModule) -> set:
    """Every call target of a graph and of the graphs inside it (a scan's body)."""
    found = set()
    for gm in module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            found |= {n.target for n in gm.graph.nodes if n.op == "call_function"}
    return found


def assert_core_aten(program: torch.export.ExportedProgram) -> None:
    allowed = {operator.getitem, torch.ops.higher_order.scan}
    for target in targets(program.graph_module) - allowed:
        assert isinstance(target, torch._ops.OpOverload), target
        assert target.namespace == "aten", target
        assert torch.Tag.core in target.tags or target.is_view, target


def close(got, want, dtype) -> None:
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def flat(result):
    out, (h, c) = result
    return [out, h, c]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_run_decompositions_gives_core_aten_that_computes_like_eager(case, dtype):
    m = model(dtype, **CASES[case])
    x = torch.randn(5, 3, 8, dtype=dtype)
    program = torch.export.export(m, (x,)).run_decompositions()
    assert_core_aten(program)
    with torch.no_grad():
        close(flat(program.module()(x)), flat(m(x)), dtype)


def test_run_decompositions_with_a_given_state_and_a_dynamic_length():
    m = model(depth=2, num_layers=2)
    h0, c0 = torch.randn(2, 3, 16), torch.randn(2, 2, 3, 16)
    steps = torch.export.Dim("steps", min=2, max=64)
    program = torch.export.export(
        m, (torch.randn(5, 3, 8), (h0, c0)), dynamic_shapes=({0: steps}, (None, None))
    ).run_decompositions()
    assert_core_aten(program)
    for length in (5, 11):  # one graph for every length
        x = torch.randn(length, 3, 8)
        with torch.no_grad():
            close(flat(program.module()(x, (h0, c0))), flat(m(x, (h0, c0))), torch.float32)


def test_a_second_export_in_the_same_process_keeps_its_dynamic_length():
    """Exporting a static length first (same shapes and dtype) must not fix a later dynamic one."""
    m = model(depth=2)
    x = torch.randn(5, 3, 8)
    torch.export.export(m, (x,)).run_decompositions()
    steps = torch.export.Dim("steps", min=2, max=64)
    program = torch.export.export(m, (x,), dynamic_shapes=({0: steps},)).run_decompositions()
    assert program.range_constraints, "the sequence length was specialised"
    x = torch.randn(11, 3, 8)
    with torch.no_grad():
        close(flat(program.module()(x)), flat(m(x)), torch.float32)


def onnx_outputs(m, x, path, **export_kwargs):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), dynamo=True, verbose=False, **export_kwargs).save(str(path))
    session = ort.InferenceSession(str(path))
    return session, [torch.from_numpy(g) for g in session.run(None, {"input": x.numpy()})]


@pytest.mark.parametrize("depth", [1, 2])
def test_onnx_export_needs_no_argument(tmp_path, depth):
    m = model(depth=depth, bidirectional=True)
    x = torch.randn(6, 3, 8)
    _, got = onnx_outputs(m, x, tmp_path / "m.onnx")
    with torch.no_grad():
        close(got, flat(m(x)), torch.float32)


def test_onnx_export_with_a_dynamic_length_runs_any_length(tmp_path):
    m = model(depth=2)
    steps = torch.export.Dim("steps", min=2, max=64)
    session, _ = onnx_outputs(
        m, torch.randn(5, 3, 8), tmp_path / "m.onnx", dynamic_shapes=({0: steps},)
    )
    x = torch.randn(12, 3, 8)
    got = [torch.from_numpy(g) for g in session.run(None, {"input": x.numpy()})]
    with torch.no_grad():
        close(got, flat(m(x)), torch.float32)


def test_compiled_inference_keeps_the_op_whole():
    """torch.compile runs the op's own loops: the decomposition is for exported programs only."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: graphs.append(gm) or gm)
    m = model(depth=2)
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        close(flat(torch.compile(m, backend=backend, fullgraph=True)(x)), flat(m(x)), x.dtype)
    found = set().union(*(targets(gm) for gm in graphs))
    assert torch.ops.nestrnn.nested_lstm.default in found
    assert torch.ops.higher_order.scan not in found
