"""Layer normalisation inside the nested cell: every CPU implementation against the reference
(``nested_lstm_naive``) given the same parameters, for outputs, h_n, c_n and every gradient
(the normalisation's parameters' included), in float64; an independent check of the reference
against ``torch.nn.functional.layer_norm``; the op's registrations (opcheck, torch.compile,
torch.export, the library for processes without nestrnn); the modules and the config key.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers_memories import Leaky
from helpers_tasks import TINY, assert_one_line_error, main_cli
from test_no_python import _run_without_nestrnn, library  # noqa: F401 (a fixture)
from test_op_nested_lstm import assert_close_all, make_case, require_implementation
from test_regularisers import _pair, _same, _train_step
from test_zoneout_op import masks

from nestrnn import NestedLSTM, NestedLSTMCell
from nestrnn.config import ModelConfig
from nestrnn.models import build_recurrent
from nestrnn.ops.common.levels import LevelNorms, encode_activations, standard_activations
from nestrnn.ops.nested_lstm import nested_lstm, nested_lstm_naive, plan
from nestrnn.ops.nested_lstm.op import flat_norms

STEPS, BATCH, INPUTS, HIDDEN = 5, 3, 2, 4
BACKENDS = ("torch_loop", "c_loop")


def make_norms(
    on: list[bool], seed: int = 3, requires_grad: bool = True, hidden: int = HIDDEN
) -> list:
    """Random LevelNorms where ``on`` says (None elsewhere), away from their init so that every
    parameter matters."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int, centre: float) -> torch.Tensor:
        t = centre + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        return t.requires_grad_(requires_grad)

    sizes = (4 * hidden, 4 * hidden, hidden, hidden)
    return [
        LevelNorms(*(rand(n, c) for n, c in zip(sizes, (1, 0, 1, 0)))) if k else None for k in on
    ]


def outputs_and_grads(fn, case, norms, **kwargs):
    """Outputs and the gradients of a fixed random linear loss w.r.t. every leaf."""
    x, weights, h0, c0 = case
    out = fn(x, weights, h0, c0, norms=norms, **kwargs)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in out)
    leaves = [x, h0, c0, *(w for lw in weights for w in lw if w is not None)]
    leaves += [t for n in norms if n is not None for t in n]
    return list(out), list(torch.autograd.grad(loss, leaves))


def pinned(backend: str):
    def run(x, weights, h0, c0, batch_sizes=None, reverse=False, **kwargs):
        return nested_lstm(x, weights, h0, c0, batch_sizes, reverse, backend=backend, **kwargs)

    return run


def assert_like_reference(backend, on, zoneout=None, batch_sizes=None, reverse=False):
    require_implementation(backend)
    case = make_case(STEPS, BATCH, INPUTS, HIDDEN, len(on), seed=len(on))
    norms = make_norms(on)
    kwargs = {"zoneout": zoneout, "batch_sizes": batch_sizes, "reverse": reverse}
    got = outputs_and_grads(pinned(backend), case, norms, **kwargs)
    want = outputs_and_grads(nested_lstm_naive, case, norms, **kwargs)
    assert_close_all(got[0], want[0], atol=1e-10, what=f"{backend} outputs")
    assert_close_all(got[1], want[1], atol=1e-9, what=f"{backend} gradients")


LEVELS = [[True], [True, True], [True, True, True], [False, True, False], [True, False]]


@pytest.mark.parametrize("on", LEVELS, ids=lambda on: "".join("LN"[k] for k in on))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loop_computes_the_reference(backend, on):
    assert_like_reference(backend, on)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_zoneout_and_a_packed_reversed_batch(backend):
    assert_like_reference(
        backend, [True, True], masks(2), batch_sizes=torch.tensor([3, 3, 2, 1, 1]), reverse=True
    )


def test_the_reference_is_torch_s_layer_norm_at_one_level():
    """An independent check: the reference's step at depth 1, written with F.layer_norm."""
    (x, weights, h0, c0), (norms,) = make_case(1, BATCH, INPUTS, HIDDEN, 1), make_norms([True])
    w = weights[0]
    z = F.linear(x[0], w.weight_ih, w.bias_ih) + F.linear(h0, w.weight_hh, w.bias_hh)
    blocks = z.unflatten(1, (4, HIDDEN))
    gates = F.layer_norm(blocks, (HIDDEN,)).flatten(1) * norms.gates_weight + norms.gates_bias
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c0[0] + torch.sigmoid(i) * torch.tanh(g)
    shown = F.layer_norm(c, (HIDDEN,), norms.cell_weight, norms.cell_bias)
    h = torch.sigmoid(o) * torch.tanh(shown)
    case = (x, weights, h0, c0)
    want = outputs_and_grads(lambda *a, norms: (h.unsqueeze(0), h, c.unsqueeze(0)), case, [norms])
    got = outputs_and_grads(nested_lstm_naive, case, [norms])
    assert_close_all(got[0], want[0], atol=1e-12)
    assert_close_all(got[1], want[1], atol=1e-12)


def test_torch_s_lstm_never_runs_layer_norm():
    x = torch.zeros(2, 1, 2)
    acts = standard_activations(1)
    assert plan(x, None, False, acts, False).implementation == "torch_lstm"
    assert plan(x, None, False, acts, False, norms=True).implementation != "torch_lstm"
    with pytest.raises(RuntimeError, match="no layer normalisation"):
        plan(x, None, False, acts, False, "torch_lstm", norms=True)


def test_a_backward_that_records_its_graph_differentiates_the_reference():
    case = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2)
    norms = make_norms([True, True])

    def second(fn):
        out, _, _ = fn(*case, norms=norms)
        (dx,) = torch.autograd.grad(out.square().sum(), case[0], create_graph=True)
        return torch.autograd.grad(dx.square().sum(), [case[2], norms[1].cell_weight])

    assert_close_all(second(nested_lstm), second(nested_lstm_naive), atol=1e-9)


def test_vmap_over_the_batch_with_layer_norm():
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    norms = make_norms([True, False], requires_grad=False)
    xs = torch.stack([x, x.flip(0)])
    got = torch.func.vmap(lambda x: nested_lstm(x, weights, h0, c0, norms=norms))(xs)
    for n in range(2):
        want = nested_lstm_naive(xs[n], weights, h0, c0, norms=norms)
        assert_close_all([t[n] for t in got], want, atol=1e-10)


# ----------------------------------------------------------------------- the op's registrations


def test_opcheck_every_op_with_norms():
    x, weights, h0, c0 = make_case(3, 2, 2, 3, 2)
    flat = [w for lw in weights for w in lw]
    norms = flat_norms(make_norms([True, False], hidden=3), x)
    bs = torch.tensor([2, 1, 1])
    args = (x, flat, h0, c0, bs, True, encode_activations(standard_activations(2)), "auto")
    for name in ("nested_lstm", "nested_lstm_train"):
        torch.library.opcheck(getattr(torch.ops.nestrnn, name).default, (*args, None, norms))
    x, h0, c0 = x.detach(), h0.detach(), c0.detach()
    flat, norms = [w.detach() for w in flat], [n.detach() for n in norms]
    out, _, _, *saved = torch.ops.nestrnn.nested_lstm_train(x, flat, h0, c0, *args[4:], None, norms)
    grads = (torch.randn_like(out), torch.randn_like(h0), torch.randn_like(c0))
    needs = [True] * (3 + len(flat) + len(norms))
    backward_args = (x, flat, h0, out, *saved, bs, True, args[6], "auto", *grads, needs)
    torch.library.opcheck(
        torch.ops.nestrnn.nested_lstm_backward.default, (*backward_args, None, norms)
    )


def test_compile_fullgraph_with_layer_norm_trains_like_eager():
    case = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2)
    norms = make_norms([True, True])
    compiled = torch.compile(nested_lstm, fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, case, norms)
    want = outputs_and_grads(nested_lstm_naive, case, norms)
    assert_close_all(got[0] + got[1], want[0] + want[1], atol=1e-9)


class _Normed(torch.nn.Module):
    def __init__(self, weights, h0, c0, norms):
        super().__init__()
        self.weights, self.h0, self.c0, self.norms = weights, h0, c0, norms

    def forward(self, x):
        return nested_lstm(x, self.weights, self.h0, self.c0, norms=self.norms)


def test_export_with_layer_norm_decomposes_and_runs_without_nestrnn(library, tmp_path):  # noqa: F811
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    norms = make_norms([False, True], requires_grad=False)
    program = torch.export.export(_Normed(weights, h0, c0, norms), (x,))
    want = nested_lstm_naive(x, weights, h0, c0, norms=norms)
    assert_close_all(list(program.module()(x)), want, atol=1e-10)
    decomposed = program.run_decompositions()
    assert torch.ops.higher_order.scan in {n.target for n in decomposed.graph.nodes}
    assert_close_all(list(decomposed.module()(x)), want, atol=1e-10)
    torch.export.save(program, tmp_path / "p")
    torch.save((x, list(want)), tmp_path / "expected.pt")
    script = """
    from pathlib import Path
    folder = Path(sys.argv[2])
    x, expected = torch.load(folder / "expected.pt")
    got = torch.export.load(folder / "p").module()(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    """
    _run_without_nestrnn(script, str(library), str(tmp_path))


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda n: n[:1], r"norms must hold 2 levels \(None for a level without\), got 1"),
        (lambda n: [n[0]._replace(cell_weight=n[0].cell_weight[:-1]), None], r"level 0 norms "),
        (lambda n: [n[0]._replace(gates_bias=n[0].gates_bias.float()), None], r"level 0 norms"),
    ],
    ids=["levels", "shape", "dtype"],
)
def test_bad_norms_are_one_clear_error(bad, message):
    x, weights, h0, c0 = make_case(STEPS, BATCH, INPUTS, HIDDEN, 2, requires_grad=False)
    norms = make_norms([True, False], requires_grad=False)
    with pytest.raises(ValueError, match=message) as caught:
        nested_lstm(x, weights, h0, c0, norms=bad(norms))
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------- the modules and configs


@pytest.mark.parametrize(
    "depth, layer_norm", [(1, True), (2, True), (3, [True, False, True])], ids=["1", "2", "3mixed"]
)
def test_the_layer_s_fast_path_trains_like_its_reference(depth, layer_norm):
    """auto (the op) against naive (the reference), bidirectional, two layers, zoneout on, every
    gradient, the normalisation's parameters included."""
    options = {"layer_norm": layer_norm, "zoneout_cell": 0.3, "zoneout_hidden": 0.2}
    shape = {"depth": depth, "num_layers": 2, "bidirectional": True}
    fast, ref = _pair(options, "auto", **shape)
    names = [n for n, _ in fast.named_parameters() if "layer_norm" in n]
    assert len(names) == 4 * 2 * 2 * sum(layernorm_levels(layer_norm, depth))
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    _same(_train_step(fast, x, seed=5), _train_step(ref, x, seed=5))
    lengths = [6, 4, 2]
    _same(_train_step(fast, x, 5, lengths), _train_step(ref, x, 5, lengths))


def layernorm_levels(layer_norm, depth: int) -> list[bool]:
    return list(layer_norm) if isinstance(layer_norm, list) else [layer_norm] * depth


def test_the_cell_steps_like_the_layer_and_the_init_is_the_identity():
    torch.manual_seed(0)
    layer = NestedLSTM(3, 4, depth=3, layer_norm=[True, True, False], forget_bias=2.0).double()
    with torch.no_grad():  # away from the init, where every parameter matters
        for name, p in layer.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    cell = NestedLSTMCell(3, 4, depth=3, layer_norm=[True, True, False], forget_bias=2.0).double()
    state = {
        k.replace("_l0", "").replace("memory_", "memory."): v for k, v in layer.state_dict().items()
    }
    cell.load_state_dict(state)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    _, (h, c) = layer(x)
    hx = None
    for t in range(4):
        hx = cell(x[t], hx)
    torch.testing.assert_close(hx[0], h[0])
    torch.testing.assert_close(hx[1], c[:, 0])
    fresh = NestedLSTM(3, 4, depth=2, layer_norm=True, forget_bias=2.0)
    forget = torch.tensor([0.0] * 4 + [2.0] * 4 + [0.0] * 8)
    assert torch.equal(fresh.layer_norm_gates_bias_l0, forget)
    assert torch.equal(fresh.memory_l0.layer_norm_gates_bias, forget)
    assert torch.equal(fresh.memory_l0.layer_norm_cell_weight, torch.ones(4))
    assert "layer_norm=True" in repr(fresh) and "layer_norm=[True, True, False]" in repr(cell)
    assert set(NestedLSTM(3, 4, depth=1).state_dict()) == set(torch.nn.LSTM(3, 4).state_dict())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layer_norm": [True]}, "layer_norm needs one bool per memory level (2), got 1"),
        ({"layer_norm": True, "proj_size": 2}, "NestedMemory with proj_size with backend='auto'"),
        ({"layer_norm": True, "backend": "generic"}, "has no layer normalisation"),
        ({"layer_norm": True, "memory": Leaky(5)}, "layer_norm runs inside the whole-sequence op"),
    ],
    ids=["levels", "proj_size", "generic", "own memory"],
)
def test_layer_norm_where_it_cannot_run_is_refused(options, message):
    depth = {} if "memory" in options else {"depth": 2}
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        NestedLSTM(3, 5, **depth, **options)
    assert "\n" not in str(caught.value)


def test_layer_norm_from_the_config(tmp_path, capsys):
    cfg = ModelConfig(family="lstm", layer_norm=[True, False])
    rnn = build_recurrent(cfg, 4, 6)
    assert isinstance(rnn, NestedLSTM) and rnn.depth == 1 and rnn.layer_norm == (True,)
    adding = ["task.length=6", "task.valid_size=16", "task.test_size=16", "train.batch_size=8"]
    steps = ["train.epochs=1", "train.steps_per_epoch=2", "--run-dir", str(tmp_path / "run")]
    settings = ["model.layer_norm=[false,true]"]
    code, out, err = main_cli(["train", *TINY, *adding, *settings, *steps], capsys)
    assert code == 0, err
    assert "finished (completed)" in out
    code, _, err = main_cli(["train", *TINY, "model.layer_norm=[true,true,true]"], capsys)
    assert_one_line_error(code, err, "train")
    assert "'model.layer_norm' has 3 values for model.depth=2" in err


def test_a_memory_given_with_its_own_layer_norm_runs_it_on_every_path():
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    outputs = []
    for backend in ("auto", "naive", "generic"):
        torch.manual_seed(0)
        spec = {"name": "nested", "layer_norm": True}
        rnn = NestedLSTM(3, 4, memory=spec, backend=backend).double()
        with torch.no_grad():  # away from the init, which is the identity
            rnn.memory_l0.layer_norm_cell_bias.add_(0.5)
        assert rnn.layer_norm == (False, True)
        outputs.append(rnn(x)[0])
    assert_close_all(outputs[1:], outputs[:1] * 2, atol=1e-12)
    message = re.escape("layer_norm=[False, False] but the memory's nested levels have layer")
    with pytest.raises(ValueError, match=message):
        NestedLSTM(3, 4, memory={"name": "nested", "layer_norm": True}, layer_norm=[False, False])
