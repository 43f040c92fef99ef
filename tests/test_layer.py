"""NestedLSTM against nn.LSTM (depth 1) and against the independent oracle (any depth)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import oracle_lstm
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from nestrnn import MemoryFunction, NestedLSTM, NestedLSTMCell

BACKENDS = ["auto", "generic", "naive"]
TOL = {"rtol": 1e-10, "atol": 1e-10}


@st.composite
def setups(draw, depth=st.integers(1, 4)):
    return {
        "input_size": draw(st.integers(1, 4)),
        "hidden_size": draw(st.integers(1, 4)),
        "num_layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "depth": draw(depth),
        "batch": draw(st.integers(1, 3)),
        "steps": draw(st.integers(1, 5)),
        "packed": draw(st.booleans()),
        "state": draw(st.sampled_from(["none", "zeros", "random"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_layer(s, backend="auto"):
    torch.manual_seed(s["seed"])
    layer = NestedLSTM(
        s["input_size"],
        s["hidden_size"],
        s["num_layers"],
        bias=s["bias"],
        batch_first=s["batch_first"],
        bidirectional=s["bidirectional"],
        depth=s["depth"],
        backend=backend,
    ).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.5)
    return layer


def make_inputs(s):
    g = torch.Generator().manual_seed(s["seed"] + 1)
    dirs = 2 if s["bidirectional"] else 1
    LD = s["num_layers"] * dirs
    lengths = [s["steps"]] * s["batch"]
    if s["packed"]:  # variable lengths, the longest not necessarily first
        lengths = torch.randint(1, s["steps"] + 1, (s["batch"],), generator=g).tolist()
    seqs = [torch.randn(n, s["input_size"], generator=g, dtype=torch.float64) for n in lengths]
    h0 = torch.randn(LD, s["batch"], s["hidden_size"], generator=g, dtype=torch.float64)
    c0 = torch.randn(s["depth"], LD, s["batch"], s["hidden_size"], generator=g, dtype=torch.float64)
    if s["state"] != "random":  # "none" means zeros inside the layer
        h0, c0 = torch.zeros_like(h0), torch.zeros_like(c0)
    return seqs, h0, c0


def user_state(s, h0, c0):
    if s["state"] == "none":
        return None
    return (h0, c0[0] if s["depth"] == 1 else c0)


def state_leaves(s, h0, c0):
    """The initial state tensors that gradients flow to (none when the layer makes zeros)."""
    return [] if s["state"] == "none" else [h0, c0]


def run_module(module, s, seqs, h0, c0, depth):
    """Run ``module`` on the sequences as the user would; returns padded (T, B, F), h_n, c_n."""
    hx = user_state(s, h0, c0)
    if s["packed"]:
        out, (h, c) = module(pack_sequence(seqs, enforce_sorted=False), hx)
        out, _ = pad_packed_sequence(out)
    else:
        x = torch.stack(seqs, dim=1)
        out, (h, c) = module(x.transpose(0, 1) if s["batch_first"] else x, hx)
        if s["batch_first"]:
            out = out.transpose(0, 1)
    return out, h, (c.unsqueeze(0) if depth == 1 else c)


def expected_by_oracle(layer, s, seqs, h0, c0):
    """Oracle results; packed sequences are run one at a time (each on its own)."""
    params = dict(layer.named_parameters())
    if not s["packed"]:
        x = torch.nn.utils.rnn.pad_sequence(seqs)
        return oracle_lstm(params, s["num_layers"], s["bidirectional"], s["depth"], x, h0, c0)
    outs, hs, cs = [], [], []
    steps = max(len(q) for q in seqs)
    for b, q in enumerate(seqs):
        out, h, c = oracle_lstm(
            params,
            s["num_layers"],
            s["bidirectional"],
            s["depth"],
            q.unsqueeze(1),
            h0[:, b : b + 1],
            c0[:, :, b : b + 1],
        )
        outs.append(torch.cat([out[:, 0], out.new_zeros(steps - len(q), out.shape[-1])]))
        hs.append(h)
        cs.append(c)
    return torch.stack(outs, dim=1), torch.cat(hs, dim=1), torch.cat(cs, dim=2)


def gradients(results, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() for r in results)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_against(expected, got, leaves_expected, leaves_got, seed):
    for e, r in zip(expected, got):
        torch.testing.assert_close(r, e, **TOL)
    for e, r in zip(gradients(expected, leaves_expected, seed), gradients(got, leaves_got, seed)):
        if e is None:
            assert r is None or not r.any()
        else:
            torch.testing.assert_close(r, e, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@given(setups(depth=st.just(1)))
def test_depth_one_is_nn_lstm(backend, s):
    torch.manual_seed(s["seed"])
    reference = nn.LSTM(
        s["input_size"],
        s["hidden_size"],
        s["num_layers"],
        bias=s["bias"],
        batch_first=s["batch_first"],
        bidirectional=s["bidirectional"],
    ).double()
    layer = make_layer(s, backend)
    layer.load_state_dict(reference.state_dict(), strict=True)
    seqs, h0, c0 = make_inputs(s)
    seqs = [q.requires_grad_() for q in seqs]
    h0.requires_grad_()
    c0.requires_grad_()
    expected = run_module(reference, s, seqs, h0, c0, 1)
    got = run_module(layer, s, seqs, h0, c0, 1)
    check_against(
        expected,
        got,
        [*seqs, h0, c0, *reference.parameters()],
        [*seqs, h0, c0, *layer.parameters()],
        s["seed"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@given(setups(depth=st.just(1)), st.data())
def test_projected_depth_one_is_nn_lstm(backend, s, data):
    """proj_size > 0 at depth 1, packed or not: nn.LSTM's results and gradients exactly."""
    s["hidden_size"] = max(s["hidden_size"], 2)
    proj = data.draw(st.integers(1, s["hidden_size"] - 1))
    torch.manual_seed(s["seed"])
    options = {"bias": s["bias"], "batch_first": s["batch_first"], "proj_size": proj}
    reference = nn.LSTM(
        s["input_size"],
        s["hidden_size"],
        s["num_layers"],
        bidirectional=s["bidirectional"],
        **options,
    ).double()
    layer = NestedLSTM(
        s["input_size"],
        s["hidden_size"],
        s["num_layers"],
        bidirectional=s["bidirectional"],
        depth=1,
        backend=backend,
        **options,
    ).double()
    layer.load_state_dict(reference.state_dict(), strict=True)
    seqs, h0, c0 = make_inputs(s)
    h0 = h0[..., :proj].contiguous()
    leaves = [*(q.requires_grad_() for q in seqs), h0.requires_grad_(), c0.requires_grad_()]
    check_against(
        run_module(reference, s, seqs, h0, c0, 1),
        run_module(layer, s, seqs, h0, c0, 1),
        [*leaves, *reference.parameters()],
        [*leaves, *layer.parameters()],
        s["seed"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@given(setups())
def test_matches_oracle(backend, s):
    layer = make_layer(s, backend)
    seqs, h0, c0 = make_inputs(s)
    seqs = [q.requires_grad_() for q in seqs]
    h0.requires_grad_()
    c0.requires_grad_()
    expected = expected_by_oracle(layer, s, seqs, h0, c0)
    got = run_module(layer, s, seqs, h0, c0, s["depth"])
    leaves = [*seqs, *state_leaves(s, h0, c0), *layer.parameters()]
    check_against(expected, got, leaves, leaves, s["seed"])


class _Trace(MemoryFunction):
    """A memory with one state of its own that starts at ``start`` (its ``init_state``)."""

    num_states = 1

    def __init__(self, hidden_size, start=0.5, shape=None):
        super().__init__(hidden_size)
        self.start, self.shape = start, shape

    def init_state(self, batch_size, dtype, device):
        shape = self.shape or (batch_size, self.hidden_size)
        return (torch.full(shape, self.start, dtype=dtype, device=device),)

    def forward(self, gated_cell, gated_input, state):
        trace = 0.5 * state[0] + gated_input
        return gated_cell + trace, (trace,)


def test_a_missing_state_starts_from_the_memory_functions_init_state():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    layer = NestedLSTM(2, 5, 2, bidirectional=True, memory=lambda h: _Trace(h)).double()
    h0 = torch.zeros(4, 3, 5, dtype=torch.float64)
    c0 = torch.stack([torch.zeros(4, 3, 5), torch.full((4, 3, 5), 0.5)]).double()
    assert torch.equal(layer(x)[0], layer(x, (h0, c0))[0])
    cell = NestedLSTMCell(2, 5, memory=_Trace(5)).double()
    assert torch.equal(cell(x[0])[1], cell(x[0], (h0[0], c0[:, 0]))[1])


@pytest.mark.parametrize("module", ["layer", "cell"])
def test_an_init_state_of_the_wrong_shape_is_a_clear_error(module):
    def memory(hidden):
        return _Trace(hidden, shape=(7, hidden))

    x = torch.randn(3, 2)
    model = (
        NestedLSTM(2, 5, memory=memory)
        if module == "layer"
        else NestedLSTMCell(2, 5, memory=memory(5))
    )
    with pytest.raises(
        RuntimeError, match=r"_Trace.init_state must return num_states=1 tensors of shape \(3, 5\)"
    ):
        model(x.unsqueeze(0) if module == "layer" else x)


def test_the_class_docstring_example_runs() -> None:
    """NestedLSTM's Examples section runs as written and prints what it shows."""
    import doctest

    from nestrnn import layer

    (test,) = doctest.DocTestFinder(recurse=False).find(layer.NestedLSTM, "NestedLSTM")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.attempted > 0 and result.failed == 0
