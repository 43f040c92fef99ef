"""The invariant suite every memory function must pass (hypothesis property tests).

Use it from your own test file in one of two ways::

    # 1. subclass (pytest collects the test_* methods)
    from nestrnn.testing import MemoryFunctionInvariants

    class TestMyMemory(MemoryFunctionInvariants):
        @staticmethod
        def make_memory(hidden_size):
            return MyMemory(hidden_size)

    # 2. one call per invariant (e.g. parametrized over many memory functions)
    from nestrnn.testing import INVARIANTS, check_invariant

    @pytest.mark.parametrize("invariant", INVARIANTS)
    def test_mine(invariant):
        check_invariant(invariant, MyMemory)

Each invariant is a function ``(make_memory, sizes) -> None`` that raises AssertionError; hypothesis
draws the sizes (hidden size, batch, steps, seed). The invariants, all in float64:

* ``state_contract``: output and state shapes, dtypes and count match ``num_states``, those of
  ``init_state`` too; ``outer_candidate_activation`` is a known activation.
* ``batch_independence``: changing one batch row never changes another row's result.
* ``deterministic``: the same inputs give the same outputs.
* ``gradients``: ``torch.autograd.gradcheck`` through the function w.r.t. inputs, state and every
  parameter, and every parameter receives a gradient.
* ``layer_bounds``: in a NestedLSTM, |h| < 1 and everything stays finite.
* ``chunking``: a sequence cut in two, with the returned state fed back, equals the whole sequence.
* ``packing``: a packed variable-length batch equals each sequence run alone.
* ``state_dict_roundtrip``: a fresh layer loading the state dict computes the same function.
* ``fast_paths``: the layer's fast paths (the whole-sequence op for additive/nested chains, the
  fused outer LSTM for anything else) equal the naive per-step path on outputs, final states and
  every gradient, bidirectional and packed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch.nn.utils.rnn import pack_sequence

from nestrnn.activations import ACTIVATIONS
from nestrnn.layer import NestedLSTM
from nestrnn.memory.base import MemoryFunction

MemoryFactory = Callable[[int], MemoryFunction]
DTYPE = torch.float64


@dataclass(frozen=True)
class Sizes:
    """One draw of sizes for an invariant."""

    hidden_size: int
    batch: int
    steps: int
    seed: int


def _memory(make_memory: MemoryFactory, sizes: Sizes) -> MemoryFunction:
    torch.manual_seed(sizes.seed)
    memory = make_memory(sizes.hidden_size)
    assert isinstance(memory, MemoryFunction), f"factory returned {type(memory).__name__}"
    return memory.to(DTYPE)


def _inputs(memory: MemoryFunction, sizes: Sizes, generator: torch.Generator):
    shape = (sizes.batch, sizes.hidden_size)

    def rand() -> torch.Tensor:
        return torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1

    return rand(), rand(), tuple(rand() for _ in range(memory.num_states))


def _layer(make_memory: MemoryFactory, sizes: Sizes, **kwargs) -> NestedLSTM:
    torch.manual_seed(sizes.seed)
    # the generic path, so that the memory function's own forward is what runs
    layer = NestedLSTM(3, sizes.hidden_size, memory=make_memory, backend="generic", **kwargs)
    layer = layer.to(DTYPE)
    with torch.no_grad():  # larger weights than the default init, to exercise saturation
        for parameter in layer.parameters():
            parameter.mul_(2.0)
    return layer


def state_contract(make_memory: MemoryFactory, sizes: Sizes) -> None:
    memory = _memory(make_memory, sizes)
    assert isinstance(memory.num_states, int) and memory.num_states >= 0, "num_states must be >= 0"
    assert memory.outer_candidate_activation in ACTIVATIONS, (
        f"outer_candidate_activation {memory.outer_candidate_activation!r} is not one of "
        f"{sorted(ACTIVATIONS)}"
    )
    initial = memory.init_state(sizes.batch, DTYPE, torch.device("cpu"))
    assert len(initial) == memory.num_states, "init_state must return num_states tensors"
    for tensor in initial:
        assert tensor.shape == (sizes.batch, sizes.hidden_size) and tensor.dtype == DTYPE
    generator = torch.Generator().manual_seed(sizes.seed)
    gated_cell, gated_input, state = _inputs(memory, sizes, generator)
    cell, new_state = memory(gated_cell, gated_input, state)
    assert cell.shape == (sizes.batch, sizes.hidden_size), f"cell shape {tuple(cell.shape)}"
    assert cell.dtype == DTYPE, f"cell dtype {cell.dtype}, expected {DTYPE}"
    assert isinstance(new_state, tuple), "the new state must be a tuple"
    assert len(new_state) == memory.num_states, (
        f"returned {len(new_state)} state tensors, num_states is {memory.num_states}"
    )
    for tensor in new_state:
        assert tensor.shape == (sizes.batch, sizes.hidden_size) and tensor.dtype == DTYPE
    assert torch.isfinite(cell).all()


def batch_independence(make_memory: MemoryFactory, sizes: Sizes) -> None:
    memory = _memory(make_memory, sizes)
    generator = torch.Generator().manual_seed(sizes.seed)
    gated_cell, gated_input, state = _inputs(memory, sizes, generator)
    cell, new_state = memory(gated_cell, gated_input, state)
    row = sizes.seed % sizes.batch
    changed = [t.clone() for t in (gated_cell, gated_input, *state)]
    for tensor in changed:
        tensor[row] = torch.rand(sizes.hidden_size, generator=generator, dtype=DTYPE)
    cell2, new_state2 = memory(changed[0], changed[1], tuple(changed[2:]))
    others = [r for r in range(sizes.batch) if r != row]
    for before, after in zip((cell, *new_state), (cell2, *new_state2)):
        torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-12)


def deterministic(make_memory: MemoryFactory, sizes: Sizes) -> None:
    memory = _memory(make_memory, sizes).eval()
    generator = torch.Generator().manual_seed(sizes.seed)
    gated_cell, gated_input, state = _inputs(memory, sizes, generator)
    first = memory(gated_cell, gated_input, state)
    second = memory(gated_cell, gated_input, state)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def gradients(make_memory: MemoryFactory, sizes: Sizes) -> None:
    memory = _memory(make_memory, sizes)
    generator = torch.Generator().manual_seed(sizes.seed)
    gated_cell, gated_input, state = _inputs(memory, sizes, generator)
    names = [name for name, _ in memory.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in memory.parameters()]
    inputs = [t.requires_grad_() for t in (gated_cell, gated_input, *state)]

    def function(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors, weights = flat[: len(inputs)], flat[len(inputs) :]
        cell, new_state = torch.func.functional_call(
            memory, dict(zip(names, weights)), (tensors[0], tensors[1], tuple(tensors[2:]))
        )
        return (cell, *new_state)

    assert torch.autograd.gradcheck(function, (*inputs, *params), eps=1e-6, atol=1e-5)
    outputs = function(*inputs, *params)
    torch.autograd.backward(
        cast(torch.Tensor, sum(o.sum() for o in outputs)), inputs=params or None
    )
    for name, param in zip(names, params):
        assert param.grad is not None, f"parameter {name} gets no gradient"


def _sequence(sizes: Sizes, batch: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sizes.seed + 1)
    batch = sizes.batch if batch is None else batch
    return torch.randn(sizes.steps, batch, 3, generator=generator, dtype=DTYPE) * 2


def layer_bounds(make_memory: MemoryFactory, sizes: Sizes) -> None:
    layer = _layer(make_memory, sizes)
    output, (h, c) = layer(_sequence(sizes) * 5)
    assert torch.isfinite(output).all() and torch.isfinite(c).all(), "non-finite output or cell"
    assert output.abs().max() < 1 and h.abs().max() < 1, "|h| must stay below 1"


def chunking(make_memory: MemoryFactory, sizes: Sizes) -> None:
    layer = _layer(make_memory, sizes, num_layers=2)
    x = _sequence(Sizes(sizes.hidden_size, sizes.batch, sizes.steps + 1, sizes.seed))
    whole, (h, c) = layer(x)
    cut = 1 + sizes.seed % sizes.steps  # both chunks non-empty
    first, state = layer(x[:cut])
    second, (h2, c2) = layer(x[cut:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)


def _sequences(sizes: Sizes) -> list[torch.Tensor]:
    """``sizes.batch`` sequences (L, 3) of random lengths 1 to ``sizes.steps``."""
    generator = torch.Generator().manual_seed(sizes.seed)
    lengths = torch.randint(1, sizes.steps + 1, (sizes.batch,), generator=generator).tolist()
    return [torch.randn(n, 3, generator=generator, dtype=DTYPE) for n in lengths]


def packing(make_memory: MemoryFactory, sizes: Sizes) -> None:
    layer = _layer(make_memory, sizes, bidirectional=True)
    sequences = _sequences(sizes)
    output, (h, c) = layer(pack_sequence(sequences, enforce_sorted=False))
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(output)
    for b, sequence in enumerate(sequences):
        alone, (h_alone, c_alone) = layer(sequence)
        torch.testing.assert_close(padded[: len(sequence), b], alone)
        torch.testing.assert_close(h[:, b], h_alone)
        torch.testing.assert_close(c[..., b, :], c_alone)


def state_dict_roundtrip(make_memory: MemoryFactory, sizes: Sizes) -> None:
    layer = _layer(make_memory, sizes)
    fresh = _layer(make_memory, Sizes(sizes.hidden_size, sizes.batch, sizes.steps, sizes.seed + 7))
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = _sequence(sizes)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0], rtol=0, atol=0)


def fast_paths(make_memory: MemoryFactory, sizes: Sizes) -> None:
    fast = _layer(make_memory, sizes, bidirectional=True)
    naive = _layer(make_memory, sizes, bidirectional=True)
    fast.backend, naive.backend = "auto", "naive"
    naive.load_state_dict(fast.state_dict(), strict=True)
    sequences = _sequences(sizes)
    results = []
    for layer in (fast, naive):
        output, (h, c) = layer(pack_sequence(sequences, enforce_sorted=False))
        loss = output.data.square().sum() + h.sum() + c.square().sum()
        results.append([output.data, h, c, *torch.autograd.grad(loss, list(layer.parameters()))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


INVARIANTS: tuple[Callable[[MemoryFactory, Sizes], None], ...] = (
    state_contract,
    batch_independence,
    deterministic,
    gradients,
    layer_bounds,
    chunking,
    packing,
    state_dict_roundtrip,
    fast_paths,
)


def check_invariant(
    invariant: Callable[[MemoryFactory, Sizes], None],
    make_memory: MemoryFactory,
    max_examples: int = 10,
) -> None:
    """Run one invariant over hypothesis-drawn sizes (raises on the first counterexample)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(
        st.builds(
            Sizes,
            hidden_size=st.integers(1, 5),
            batch=st.integers(1, 4),
            steps=st.integers(1, 6),
            seed=st.integers(0, 2**16),
        )
    )
    def run(sizes: Sizes) -> None:
        invariant(make_memory, sizes)

    run()


class MemoryFunctionInvariants:
    """Subclass in a test file and define ``make_memory(hidden_size)`` to get every invariant."""

    max_examples = 10

    @staticmethod
    def make_memory(hidden_size: int) -> MemoryFunction:
        raise NotImplementedError("define make_memory(hidden_size) in the subclass")

    def _check(self, invariant: Callable[[MemoryFactory, Sizes], None]) -> None:
        check_invariant(invariant, self.make_memory, self.max_examples)

    def test_state_contract(self) -> None:
        self._check(state_contract)

    def test_batch_independence(self) -> None:
        self._check(batch_independence)

    def test_deterministic(self) -> None:
        self._check(deterministic)

    def test_gradients(self) -> None:
        self._check(gradients)

    def test_layer_bounds(self) -> None:
        self._check(layer_bounds)

    def test_chunking(self) -> None:
        self._check(chunking)

    def test_packing(self) -> None:
        self._check(packing)

    def test_state_dict_roundtrip(self) -> None:
        self._check(state_dict_roundtrip)

    def test_fast_paths(self) -> None:
        self._check(fast_paths)
