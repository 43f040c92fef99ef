"""Bad input gets a clear one-line error naming the argument, before any computation, with the
exception type nn.LSTM raises for the same mistake."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from nestrnn import MemoryFunction, NestedLSTM, NestedLSTMCell


class Scaled(MemoryFunction):
    """A memory function the whole-sequence op cannot run."""

    def forward(self, gated_cell, gated_input, state):
        return 0.5 * (gated_cell + gated_input), ()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth": 0}, ValueError, "depth must be greater than zero"),
        ({"depth": 2.5}, TypeError, "depth should be of type int, got: float"),
        ({"hidden_size": 0}, ValueError, "hidden_size must be greater than zero"),
        ({"num_layers": -1}, ValueError, "num_layers must be greater than zero"),
        ({"proj_size": 4}, ValueError, "proj_size has to be smaller than hidden_size"),
        ({"dropout": 1.5}, ValueError, r"dropout should be a number in range \[0, 1\]"),
        ({"bias": "yes"}, TypeError, "bias should be of type bool, got: str"),
        ({"memory": "nestd"}, LookupError, "unknown memory 'nestd'; known memory names"),
        ({"memory": {"name": "nested", "cell_activation": "tanhh"}}, ValueError, "cell_activation"),
        ({"memory": {"name": "nested", "deepness": 3}}, TypeError, "invalid options for memory"),
        ({"memory": "nested", "depth": 3}, ValueError, "depth=3 does not match"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        (
            {"backend": "fused"},
            ValueError,
            r"one of \('generic', 'naive', 'auto', 'torch_lstm'",
        ),
        ({"recurrent_init": "identity"}, ValueError, "recurrent_init must be one of"),
        ({"forget_bias": "one"}, TypeError, "forget_bias must be a finite number"),
        (
            {"memory": lambda hidden: Scaled(hidden), "backend": "c_loop"},
            ValueError,
            "backend='c_loop' runs the whole-sequence op",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    arguments = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        NestedLSTM(**arguments)


@pytest.fixture
def layer():
    return NestedLSTM(3, 4, num_layers=2, depth=2)


@pytest.mark.parametrize(
    ("make_input", "error", "match"),
    [
        (lambda: torch.randn(2, 2, 2, 3), ValueError, "expected input to be 2-D or 3-D, got 4-D"),
        (lambda: torch.randn(5, 2, 7), RuntimeError, "input_size. Expected 3, got 7"),
        (
            lambda: torch.randn(5, 2, 3, dtype=torch.float64),
            ValueError,
            r"input dtype \(torch.float64\)",
        ),
        (lambda: torch.ones(5, 2, 3, dtype=torch.long), ValueError, "does not match weight dtype"),
        (lambda: [[1.0, 2.0, 3.0]], TypeError, "input must be a Tensor or PackedSequence"),
    ],
)
def test_input_errors(layer, make_input, error, match):
    with pytest.raises(error, match=match):
        layer(make_input())


def test_state_errors(layer):
    x = torch.randn(5, 2, 3)
    h, c = torch.zeros(2, 2, 4), torch.zeros(2, 2, 2, 4)
    with pytest.raises(RuntimeError, match=r"expected c_0 of shape \(2, 2, 2, 4\) \(one cell per"):
        layer(x, (h, c[0]))
    with pytest.raises(RuntimeError, match=r"expected h_0 of shape \(2, 2, 4\), got \(1, 2, 4\)"):
        layer(x, (h[:1], c))
    with pytest.raises(TypeError, match="hx must be a tuple"):
        layer(x, h)
    with pytest.raises(RuntimeError, match="c_0 has dtype torch.float64"):
        layer(x, (h, c.double()))
    with pytest.raises(TypeError, match="h_0 must be a Tensor"):
        layer(x, ([0.0], c))
    with pytest.raises(ValueError, match="expected PackedSequence data to be 2-D"):
        from torch.nn.utils.rnn import PackedSequence

        layer(PackedSequence(torch.randn(3, 1, 3), torch.tensor([1, 1, 1])))
    packed = pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])
    with pytest.raises(RuntimeError, match=r"expected h_0 of shape \(2, 2, 4\)"):
        layer(packed, (torch.zeros(2, 3, 4), c))


def test_device_mismatch_is_a_clear_error(layer):
    meta = torch.randn(5, 2, 3, device="meta")
    with pytest.raises(
        RuntimeError, match="input is on meta but the module's parameters are on cpu"
    ):
        layer(meta)


def test_cell_errors():
    cell = NestedLSTMCell(3, 4, depth=3)
    with pytest.raises(ValueError, match="expected input to be 1-D or 2-D"):
        cell(torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match=r"expected c_0 of shape \(3, 2, 4\)"):
        cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="depth must be greater than zero"):
        NestedLSTMCell(3, 4, depth=0)
