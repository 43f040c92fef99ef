"""Layer-level invariants: chunking, batch independence, bounds, parameters, cells, unbatched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nestrnn import NestedLSTM, NestedLSTMCell, memory_names
from nestrnn.memory import build_memory

BACKENDS = ["auto", "generic"]


def random_layer(depth, hidden, layers=1, bidirectional=False, backend="auto", seed=0, scale=2.0):
    torch.manual_seed(seed)
    layer = NestedLSTM(
        3, hidden, layers, bidirectional=bidirectional, depth=depth, backend=backend
    ).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(scale)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@given(depth=st.integers(1, 4), layers=st.integers(1, 2), steps=st.integers(2, 7), data=st.data())
def test_chunked_sequence_equals_whole(backend, depth, layers, steps, data):
    cut = data.draw(st.integers(1, steps - 1))
    layer = random_layer(depth, 3, layers, False, backend)
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    whole, (h, c) = layer(x)
    first, state = layer(x[:cut])
    second, (h2, c2) = layer(x[cut:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c2, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(depth=st.integers(1, 4), batch=st.integers(2, 4), row=st.integers(0, 3))
def test_batch_rows_are_independent(backend, depth, batch, row):
    row = row % batch
    layer = random_layer(depth, 3, 2, True, backend)
    x = torch.randn(4, batch, 3, dtype=torch.float64)
    out, (h, c) = layer(x)
    x2 = x.clone()
    x2[:, row] = torch.randn(4, 3, dtype=torch.float64)
    out2, (h2, c2) = layer(x2)
    others = [b for b in range(batch) if b != row]
    torch.testing.assert_close(out2[:, others], out[:, others], rtol=0, atol=1e-13)
    torch.testing.assert_close(h2[:, others], h[:, others], rtol=0, atol=1e-13)
    torch.testing.assert_close(c2[..., others, :], c[..., others, :], rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@given(depth=st.integers(2, 4), scale=st.floats(0.5, 6.0), seed=st.integers(0, 999))
def test_hidden_and_upper_cells_are_bounded(backend, depth, scale, seed):
    """|h| < 1, and every cell made by an ascent (all but the innermost) is in (-1, 1)."""
    layer = random_layer(depth, 4, 1, False, backend, seed=seed, scale=scale)
    x = torch.randn(12, 3, 3, dtype=torch.float64) * 4
    out, (h, c) = layer(x)
    assert out.abs().max() < 1 and h.abs().max() < 1
    assert c[:-1].abs().max() < 1
    assert torch.isfinite(c).all()


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_equals_stacked_lstm(depth, bias):
    for layers, bidirectional in [(1, False), (2, True)]:
        nested = NestedLSTM(7, 5, layers, bias=bias, bidirectional=bidirectional, depth=depth)
        stacked = nn.LSTM(7, 5, depth, bias=bias)
        per_direction = sum(p.numel() for p in stacked.parameters())
        if layers == 1 and not bidirectional:
            assert sum(p.numel() for p in nested.parameters()) == per_direction
        H, b = 5, 2 if bias else 0
        expected_l0 = 4 * H * (7 + H + b) + (depth - 1) * 4 * H * (2 * H + b)
        expected_l1 = 4 * H * (2 * H + H + b) + (depth - 1) * 4 * H * (2 * H + b)
        dirs = 2 if bidirectional else 1
        expected = dirs * (expected_l0 + (expected_l1 if layers == 2 else 0))
        assert sum(p.numel() for p in nested.parameters()) == expected


def test_parameter_names():
    layer = NestedLSTM(3, 4, 2, bidirectional=True, depth=3)
    names = set(dict(layer.named_parameters()))
    for sfx in ["l0", "l0_reverse", "l1", "l1_reverse"]:
        for w in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]:
            assert f"{w}_{sfx}" in names
            assert f"memory_{sfx}.{w}" in names
            assert f"memory_{sfx}.inner.{w}" in names
    assert layer.memory_l0.inner.weight_ih.shape == (16, 4)


def test_state_dict_round_trip_and_default_init():
    layer = NestedLSTM(3, 4, 2, depth=3)
    # paper defaults: forget bias 1 on every level, orthogonal recurrent gate blocks
    for prefix in ["", "memory_l0.", "memory_l0.inner."]:
        sd = layer.state_dict()
        bias = sd[f"{prefix}bias_ih" if prefix else "bias_ih_l0"]
        assert torch.all(bias[4:8] == 1) and torch.all(bias[:4] == 0)
        w_hh = sd[f"{prefix}weight_hh" if prefix else "weight_hh_l0"]
        for block in w_hh.chunk(4):
            torch.testing.assert_close(block @ block.T, torch.eye(4), atol=1e-5, rtol=0)
    fresh = NestedLSTM(3, 4, 2, depth=3, forget_bias=None, recurrent_init="uniform")
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", memory_names())
def test_layer_gradcheck_for_every_registered_memory(name):
    torch.manual_seed(0)
    layer = NestedLSTM(2, 2, memory=name, backend="auto").double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layer.num_cells, 1, 2, 2, dtype=torch.float64)
    c0 = (c0[0] if layer.num_cells == 1 else c0).requires_grad_()
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def run(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, weights)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_unbatched_input_matches_batch_of_one(depth):
    layer = NestedLSTM(3, 4, 2, bidirectional=True, depth=depth, batch_first=True)
    x = torch.randn(5, 3)
    out, (h, c) = layer(x)
    out_b, (h_b, c_b) = layer(x.unsqueeze(0))
    torch.testing.assert_close(out, out_b[0])
    torch.testing.assert_close(h, h_b[:, 0])
    torch.testing.assert_close(c, c_b[..., 0, :])
    out2, _ = layer(x, (h, c))  # the returned unbatched state is accepted back
    assert out2.shape == out.shape


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cell_matches_one_layer_step_by_step(depth):
    torch.manual_seed(0)
    layer = NestedLSTM(3, 4, depth=depth, backend="generic")
    cell = NestedLSTMCell(3, 4, depth=depth)
    renamed = {  # weight_ih_l0 -> weight_ih, memory_l0.x -> memory.x
        ("memory." + k[len("memory_l0.") :])
        if k.startswith("memory_l0.")
        else k.replace("_l0", ""): v
        for k, v in layer.state_dict().items()
    }
    cell.load_state_dict(renamed, strict=True)
    x = torch.randn(6, 2, 3)
    out, (h_n, c_n) = layer(x)
    state = None
    for t in range(6):
        h, c = cell(x[t], state)
        state = (h, c)
        torch.testing.assert_close(h, out[t])
    torch.testing.assert_close(h, h_n[0])
    torch.testing.assert_close(c, c_n[..., 0, :, :] if depth > 1 else c_n[0])


def test_cell_depth_one_loads_lstm_cell():
    reference = nn.LSTMCell(3, 4).double()
    cell = NestedLSTMCell(3, 4, depth=1).double()
    cell.load_state_dict(reference.state_dict(), strict=True)
    x, h, c = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    for got, expected in zip(cell(x, (h, c)), reference(x, (h, c))):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got, expected in zip(cell(x[0]), reference(x[0])):  # unbatched, no state
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_explicit_composition_equals_depth():
    torch.manual_seed(0)
    by_depth = NestedLSTM(3, 4, depth=3)
    spec = {"name": "nested", "inner": {"name": "nested", "inner": "additive"}}
    composed = NestedLSTM(3, 4, memory=spec)
    assert composed.depth == 3
    composed.load_state_dict(by_depth.state_dict(), strict=True)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(composed(x)[0], by_depth(x)[0])
    instance = build_memory(spec, 4)
    assert NestedLSTM(3, 4, memory=instance, num_layers=2).memory_l1.inner.inner is not None


def test_custom_activation_runs_the_op_like_the_generic_path_and_differs():
    torch.manual_seed(0)
    standard = NestedLSTM(3, 4, depth=2).double()
    memory = {"name": "nested", "cell_activation": "softsign", "outer_candidate_activation": "relu"}
    changed = NestedLSTM(3, 4, memory=memory).double()
    generic = NestedLSTM(3, 4, memory=memory, backend="generic").double()
    changed.load_state_dict(standard.state_dict())
    generic.load_state_dict(standard.state_dict())
    assert changed.memory_l0.fused_levels() is not None  # the variant runs the fused op
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(changed(x)[0], generic(x)[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(changed(x)[0], standard(x)[0])


@pytest.mark.parametrize("depth", [2, 3])
def test_projection_above_depth_one_matches_a_step_by_step_reference(depth):
    """proj_size > 0 above depth 1: h = W_hr (o * tanh(c)) is proj_size wide and feeds the
    recurrence and the next layer; written out here step by step from the parameters."""
    torch.manual_seed(depth)
    layer = NestedLSTM(3, 5, num_layers=2, proj_size=2, depth=depth).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out, (h_n, c_n) = layer(x)
    assert out.shape == (4, 2, 2) and h_n.shape == (2, 2, 2) and c_n.shape == (depth, 2, 2, 5)
    inputs = x
    for k in range(2):
        w_ih, w_hh = getattr(layer, f"weight_ih_l{k}"), getattr(layer, f"weight_hh_l{k}")
        b = getattr(layer, f"bias_ih_l{k}") + getattr(layer, f"bias_hh_l{k}")
        w_hr, memory = getattr(layer, f"weight_hr_l{k}"), getattr(layer, f"memory_l{k}")
        h = torch.zeros(2, 2, dtype=torch.float64)
        cells = [torch.zeros(2, 5, dtype=torch.float64)] * depth
        outputs = []
        for t in range(4):
            i, f, g, o = (inputs[t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=1)
            i, f, o = i.sigmoid(), f.sigmoid(), o.sigmoid()  # identity candidate: nested
            cell, state = memory(f * cells[0], i * g, tuple(cells[1:]))
            h = (o * cell.tanh()) @ w_hr.T
            cells = [cell, *state]
            outputs.append(h)
        torch.testing.assert_close(h_n[k], h)
        torch.testing.assert_close(c_n[:, k], torch.stack(cells))
        inputs = torch.stack(outputs)
    torch.testing.assert_close(out, inputs)
