"""Weight drop, locked dropout, zoneout and segment recomputation (``nestrnn.regularisers``) in
NestedLSTM, NestedLSTMCell, the model families and the configs.

The fast paths are compared with the reference (``backend="naive"``) given the same masks: each
model draws its masks from the same seed in the same order, before its recurrence runs."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from helpers_memories import Leaky
from helpers_tasks import TINY, assert_one_line_error, main_cli
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

import nestrnn.layer
from nestrnn import NestedLSTM, NestedLSTMCell
from nestrnn.config import ModelConfig
from nestrnn.models import HeadDropout, build_recurrent
from nestrnn.ops.common.levels import LevelActivations
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive
from nestrnn.regularisers import sequence_dropout, zoneout_weights

ALL_ON = {
    "weight_drop": 0.4,
    "zoneout_cell": 0.3,
    "zoneout_hidden": 0.2,
    "locked_dropout": True,
    "dropout": 0.2,
    "input_dropout": 0.1,
    "output_dropout": 0.1,
}


def _train_step(
    model: NestedLSTM, x: Tensor, seed: int, lengths: list[int] | None = None
) -> list[Tensor]:
    """Outputs, final state and every gradient of one training step drawn from ``seed``."""
    model.train()
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    given = pack_padded_sequence(xi, lengths) if lengths else xi
    out, (h, c) = model(given)
    data = out.data if lengths else out
    weights = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)
    ((data * weights).sum() + h.pow(2).sum() + c.sin().sum()).backward()
    return [data, h, c, xi.grad, *(p.grad for p in model.parameters())]


def _same(got: list[Tensor], want: list[Tensor], tol: float = 1e-10) -> None:
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        if b is None:
            assert a is None, n
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=n: f"[{n}] {m}")


def _pair(options: dict[str, Any], backend: str, **shape: Any) -> tuple[NestedLSTM, NestedLSTM]:
    torch.manual_seed(0)
    fast = NestedLSTM(3, 5, backend=backend, **shape, **options).double()
    ref = NestedLSTM(3, 5, backend="naive", **shape, **options).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("backend", ["auto", "torch_loop"])
def test_the_fast_paths_match_the_reference_given_the_same_masks(depth: int, backend: str) -> None:
    fast, ref = _pair(ALL_ON, backend, depth=depth, num_layers=2)
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    _same(_train_step(fast, x, seed=5), _train_step(ref, x, seed=5))


def test_every_regulariser_per_level_bidirectional_packed_and_recomputed() -> None:
    options = {**ALL_ON, "weight_drop": [0.5, 0.2, 0.0], "zoneout_cell": [0.1, 0.0, 0.4]}
    fast, ref = _pair(options, "auto", depth=3, num_layers=2, bidirectional=True)
    x = torch.randn(9, 3, 3, dtype=torch.float64)
    want = _train_step(ref, x, seed=2, lengths=[9, 6, 2])
    _same(_train_step(fast, x, seed=2, lengths=[9, 6, 2]), want)
    fast.checkpoint_every = 4
    _same(_train_step(fast, x, seed=2, lengths=[9, 6, 2]), want)


def test_regularisers_are_off_in_evaluation_but_zoneout_which_is_its_expectation() -> None:
    torch.manual_seed(0)
    plain = NestedLSTM(3, 5, depth=2, num_layers=2).double().eval()
    options = {**ALL_ON, "zoneout_cell": [0.3, 0.6]}
    regularised = NestedLSTM(3, 5, depth=2, num_layers=2, **options).double().eval()
    regularised.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    regularised.zoneout_cell, regularised.zoneout_hidden = (0.0, 0.0), 0.0
    _same(list(regularised(x)[0:1]), list(plain(x)[0:1]))  # dropouts and weight drop: identity

    regularised.zoneout_cell, regularised.zoneout_hidden = (0.3, 0.6), 0.2
    out, (h, c) = regularised(x)
    rates = torch.tensor([0.3, 0.6, 0.2], dtype=torch.float64).view(3, 1, 1, 1)
    layer_input = x
    for layer in range(2):  # the expectation p * previous + (1 - p) * new, layer by layer
        levels = getattr(regularised, f"memory_l{layer}").fused_levels()
        weights = [regularised._outer_weights(f"l{layer}"), *(w for w, _ in levels)]
        acts = (LevelActivations(candidate="identity"), *(a for _, a in levels))
        h0, c0 = x.new_zeros(2, 5), x.new_zeros(2, 2, 5)
        zoneout = rates.expand(3, 6, 2, 5)
        layer_input, h_n, c_n = nested_lstm_naive(
            layer_input, weights, h0, c0, None, False, acts, zoneout=zoneout
        )
    _same([out, h[1], c[:, 1]], [layer_input, h_n, c_n])


def test_weight_drop_is_one_dropconnect_mask_per_call_on_every_levels_weight_hh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list] = []
    real = nestrnn.layer.nested_lstm

    def spy(x, weights, *args, **kwargs):
        seen.append(list(weights))
        return real(x, weights, *args, **kwargs)

    monkeypatch.setattr(nestrnn.layer, "nested_lstm", spy)
    model = NestedLSTM(4, 16, depth=2, weight_drop=[0.5, 0.25])
    x = torch.randn(5, 2, 4)
    out, _ = model(x)
    out.sum().backward()
    raw = [model._outer_weights("l0"), model.memory_l0.fused_levels()[0][0]]
    for level, rate in enumerate((0.5, 0.25)):
        passed, param = seen[0][level], raw[level]
        kept = passed.weight_hh != 0
        assert abs(1 - kept.double().mean().item() - rate) < 0.1  # about ``rate`` dropped
        torch.testing.assert_close(passed.weight_hh[kept], param.weight_hh[kept] / (1 - rate))
        assert passed.weight_ih is param.weight_ih  # only weight_hh is dropped
    grad = model.weight_hh_l0.grad
    assert torch.all(grad[seen[0][0].weight_hh == 0] == 0)  # no gradient through dropped links
    model(x)
    assert not torch.equal(seen[1][0].weight_hh, seen[0][0].weight_hh)  # a new mask per call
    model.eval()
    model(x)
    assert seen[2][0].weight_hh is model.weight_hh_l0  # identity in evaluation


def test_locked_dropout_draws_one_mask_per_sequence() -> None:
    ones = torch.ones(50, 4, 30)
    locked = sequence_dropout(ones, 0.5, True, locked=True)
    assert torch.equal(locked, locked[:1].expand_as(locked))
    assert set(locked.unique().tolist()) == {0.0, 2.0}
    free = sequence_dropout(ones, 0.5, True, locked=False)
    assert not torch.equal(free, free[:1].expand_as(free))
    assert sequence_dropout(ones, 0.5, False, locked=True) is ones
    batch_first = sequence_dropout(torch.ones(4, 50, 30), 0.5, True, locked=True, time_dim=1)
    assert torch.equal(batch_first, batch_first[:, :1].expand_as(batch_first))


def test_zoneout_masks_are_fresh_bernoulli_draws_in_training_and_the_rates_in_evaluation() -> None:
    like = torch.zeros(1, dtype=torch.float64)
    masks = zoneout_weights((0.2, 0.7), 0.5, 400, 8, 16, True, like)
    assert masks is not None and masks.shape == (3, 400, 8, 16)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    means = masks.mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([0.2, 0.7, 0.5]).double(), atol=0.02, rtol=0)
    assert not torch.equal(masks[:, 0], masks[:, 1])  # fresh per step
    rates = zoneout_weights((0.2, 0.7), 0.5, 400, 8, 16, False, like)
    assert rates is not None and rates.stride()[1:3] == (0, 0)  # no copy along T and B
    assert torch.equal(rates[:, 17, 3, 5], torch.tensor([0.2, 0.7, 0.5], dtype=torch.float64))
    assert zoneout_weights((0.0, 0.0), 0.0, 4, 2, 3, True, like) is None


def test_zoneout_masks_are_the_same_in_every_dtype():
    """From one seed a model in float64, float32 or bfloat16 draws the same masks (in its own
    dtype), so that runs in different precisions can be compared mask for mask."""
    drawn = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        torch.manual_seed(4)
        masks = zoneout_weights((0.3, 0.05), 0.5, 6, 3, 7, True, torch.zeros(1, dtype=dtype))
        assert masks is not None and masks.dtype == dtype
        drawn.append(masks.double())
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])


def test_segment_recomputation_keeps_results_and_saves_far_less() -> None:
    def saved_bytes(model: torch.nn.Module, x: Tensor) -> int:
        total = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)[0].sum()
        return total

    torch.manual_seed(0)
    plain = NestedLSTM(8, 16, depth=2, zoneout_cell=0.2, weight_drop=0.3).double()
    segmented = NestedLSTM(8, 16, depth=2, zoneout_cell=0.2, weight_drop=0.3, checkpoint_every=8)
    segmented.double().load_state_dict(plain.state_dict())
    x = torch.randn(96, 4, 8, dtype=torch.float64)
    _same(_train_step(segmented, x, seed=3), _train_step(plain, x, seed=3))
    assert saved_bytes(segmented, x) * 4 < saved_bytes(plain, x)

    torch.manual_seed(0)  # the generic path of a memory function of a user's own
    plain = NestedLSTM(8, 16, memory=Leaky(16), weight_drop=0.3).double()
    segmented = NestedLSTM(8, 16, memory=Leaky(16), weight_drop=0.3, checkpoint_every=5)
    segmented.double().load_state_dict(plain.state_dict())
    _same(_train_step(segmented, x[:23], seed=3), _train_step(plain, x[:23], seed=3))


def test_the_cell_zones_out_like_the_layer() -> None:
    torch.manual_seed(0)
    cell = NestedLSTMCell(3, 5, depth=2, zoneout_cell=[0.3, 0.5], zoneout_hidden=0.2).double()
    layer = NestedLSTM(3, 5, depth=2, zoneout_cell=[0.3, 0.5], zoneout_hidden=0.2).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").copy_(getattr(cell, name))
        layer.memory_l0.load_state_dict(cell.memory.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(cell, mode)(), getattr(layer, mode)()
        torch.manual_seed(9)
        out, (h_n, c_n) = layer(x)
        torch.manual_seed(9)
        masks = zoneout_weights((0.3, 0.5), 0.2, 4, 2, 5, mode == "train", x)
        assert masks is not None
        h, c = x.new_zeros(2, 5), x.new_zeros(2, 2, 5)
        for t in range(4):
            h, c = cell(x[t], (h, c), zoneout=masks[:, t])
            _same([h], [out[t]])
        _same([h, c], [h_n[0], c_n[:, 0]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weight_drop": 1.0}, "weight_drop must be a probability in [0, 1)"),
        ({"weight_drop": [0.1]}, "weight_drop needs one rate per memory level (2), got 1"),
        ({"zoneout_cell": "0.5"}, "zoneout_cell must be a probability"),
        ({"zoneout_hidden": -0.1}, "zoneout_hidden must be a probability"),
        ({"checkpoint_every": 0}, "checkpoint_every must be greater than zero"),
        ({"zoneout_hidden": 0.1, "proj_size": 2}, "zoneout runs inside the whole-sequence op"),
        ({"zoneout_cell": 0.1, "backend": "generic"}, "zoneout runs inside the whole-sequence"),
        ({"weight_drop": [0.1, 0.2], "backend": "generic"}, "weight_drop of the inner levels"),
    ],
)
def test_bad_settings_are_refused_with_what_is_expected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NestedLSTM(3, 5, depth=2, **options)


def test_lstm_baselines_take_level_zeros_rates_on_nestrnns_depth_1_layer() -> None:
    cfg = ModelConfig(family="stacked_lstm", depth=2, weight_drop=[0.5, 0.1], zoneout_cell=0.2)
    rnn = build_recurrent(cfg, 4, 6)
    assert isinstance(rnn, NestedLSTM) and rnn.num_layers == 2 and rnn.depth == 1
    assert rnn.weight_drop == (0.5,) and rnn.zoneout_cell == (0.2,)
    assert set(rnn.state_dict()) == set(torch.nn.LSTM(4, 6, 2).state_dict())
    plain = build_recurrent(ModelConfig(family="lstm"), 4, 6)
    assert type(plain) is torch.nn.LSTM
    head = HeadDropout(ModelConfig(dropout=0.3, input_dropout=0.1, locked_dropout=True))
    assert (head.input_rate, head.output_rate, head.locked) == (0.1, 0.3, True)


def test_train_with_every_regulariser_from_the_cli(tmp_path, capsys) -> None:
    settings = [
        "model.weight_drop=[0.3,0.1]",
        "model.zoneout_cell=0.2",
        "model.zoneout_hidden=0.05",
        "model.locked_dropout=true",
        "model.input_dropout=0.1",
        "model.checkpoint_every=3",
    ]
    adding = ["task.length=6", "task.valid_size=16", "task.test_size=16", "train.batch_size=8"]
    steps = ["train.epochs=1", "train.steps_per_epoch=3", "--run-dir", str(tmp_path / "run")]
    code, out, err = main_cli(["train", *TINY, *adding, *settings, *steps], capsys)
    assert code == 0, err
    assert "finished (completed)" in out
    code, _, err = main_cli(["train", *TINY, "model.zoneout_cell=[0.1,0.2,0.3]"], capsys)
    assert_one_line_error(code, err, "train")
    assert "'model.zoneout_cell' has 3 rates for model.depth=2" in err
    code, _, err = main_cli(["train", *TINY, "model.weight_drop=1.5"], capsys)
    assert_one_line_error(code, err, "train")
    assert "'model.weight_drop' must be a rate in [0, 1)" in err


def test_compile_and_export_see_the_regularisers() -> None:
    options = {**ALL_ON, "checkpoint_every": 3}
    torch.manual_seed(0)
    model = NestedLSTM(3, 5, depth=2, num_layers=2, **options).double()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    eager_step = _train_step(model, x, seed=4)
    _same(_train_step(compiled, x, seed=4), eager_step)  # the same masks from the same seed

    model.eval()
    exported = torch.export.export(model, (x,))
    _same(list(exported.module()(x)[0:1]), list(model(x)[0:1]))  # zoneout's expectation
