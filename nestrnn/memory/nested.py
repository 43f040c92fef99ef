"""The nested memory function: an inner LSTM computes the outer cell (Moniz & Krueger, 2017)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestrnn.activations import get_activation
from nestrnn.init import check_init_options, init_lstm_level
from nestrnn.memory.base import MemoryFunction, State
from nestrnn.ops.nested_lstm.common import LevelWeights

DEFAULT_ACTIVATIONS = {
    "gate_activation": "sigmoid",
    "candidate_activation": "tanh",
    "cell_activation": "tanh",
    "outer_candidate_activation": "identity",
}


class NestedMemory(MemoryFunction):
    """One nested LSTM level; its own cell update is another memory function (``inner``).

    Given ``gated_cell = f * c_{t-1}`` (B, H) and ``gated_input = i * g`` (B, H) from the level
    above, this level runs an LSTM step whose input is ``x~ = gated_input`` and whose previous hidden
    state is ``h~ = gated_cell``::

        i, f, g, o = split(W_ih x~ + b_ih + W_hh h~ + b_hh)
        i, f, o = gate_activation(.);  g = candidate_activation(g)
        c_inner = inner(f * c_inner_prev, i * g)
        cell    = o * cell_activation(c_inner)        # the new cell of the level above

    Parameters are named like ``nn.LSTMCell``: ``weight_ih`` (4H, H), ``weight_hh`` (4H, H),
    ``bias_ih``, ``bias_hh`` (4H,). State: this level's cell followed by ``inner``'s state.

    Args:
        hidden_size: H.
        depth: memory levels of a layer that uses this function, counting the outer LSTM: 2 means
            one nested level with an additive inner update (the paper's model), 3 nests once more.
            Ignored when ``inner`` is given.
        inner: the inner memory: a MemoryFunction, a registered name or a ``{"name": ...}`` dict.
        bias: whether this level (and levels built from ``depth``) have biases.
        forget_bias: initial forget-gate bias (None: PyTorch's uniform initialisation).
        recurrent_init: "orthogonal" (default) or "uniform" for ``weight_hh``.
        gate_activation, candidate_activation, cell_activation: this level's activations.
        outer_candidate_activation: what the level above applies to its candidate g (the paper: the
            identity when nested).
    """

    def __init__(
        self,
        hidden_size: int,
        depth: int = 2,
        inner: MemoryFunction | str | dict[str, Any] | None = None,
        bias: bool = True,
        forget_bias: float | None = 1.0,
        recurrent_init: str = "orthogonal",
        gate_activation: str = "sigmoid",
        candidate_activation: str = "tanh",
        cell_activation: str = "tanh",
        outer_candidate_activation: str = "identity",
    ) -> None:
        super().__init__(hidden_size)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ValueError(f"depth of a nested memory must be an integer >= 2, got {depth!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        check_init_options(forget_bias, recurrent_init)
        self._gate = get_activation(gate_activation, "gate_activation")
        self._candidate = get_activation(candidate_activation, "candidate_activation")
        self._cell = get_activation(cell_activation, "cell_activation")
        get_activation(outer_candidate_activation, "outer_candidate_activation")
        self.activations = {
            "gate_activation": gate_activation,
            "candidate_activation": candidate_activation,
            "cell_activation": cell_activation,
            "outer_candidate_activation": outer_candidate_activation,
        }
        self.outer_candidate_activation = outer_candidate_activation
        self.bias = bias
        self.forget_bias = forget_bias
        self.recurrent_init = recurrent_init

        from nestrnn.memory.build import build_memory  # the registry imports this module

        inherited = {"bias": bias, "forget_bias": forget_bias, "recurrent_init": recurrent_init}
        if inner is None and depth > 2:
            inner = type(self)(hidden_size, depth=depth - 1, **inherited, **self.activations)
        self.inner = build_memory("additive" if inner is None else inner, hidden_size, inherited)
        self.num_states = 1 + self.inner.num_states

        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, hidden_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates))
            self.bias_hh = nn.Parameter(torch.empty(gates))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_lstm_level(
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
            self.forget_bias,
            self.recurrent_init,
        )
        self.inner.reset_parameters()

    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        own_cell, inner_state = state[0], tuple(state[1:])
        gates = F.linear(gated_input, self.weight_ih, self.bias_ih) + F.linear(
            gated_cell, self.weight_hh, self.bias_hh
        )
        i, f, g, o = gates.chunk(4, dim=1)
        i, f, o = self._gate(i), self._gate(f), self._gate(o)
        g = self._candidate(g)
        new_own_cell, new_inner_state = self.inner(f * own_cell, i * g, inner_state)
        return o * self._cell(new_own_cell), (new_own_cell, *new_inner_state)

    def level_weights(self) -> LevelWeights:
        return LevelWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def fused_levels(self) -> list[LevelWeights] | None:
        # Only the unmodified update with the paper's activations matches the fused op; a subclass
        # that changes ``forward`` must not inherit the fast path silently.
        standard = type(self).forward is NestedMemory.forward and all(
            self.activations[key] == DEFAULT_ACTIVATIONS[key]
            for key in ("gate_activation", "candidate_activation", "cell_activation")
        )
        inner_levels = self.inner.fused_levels() if standard else None
        if inner_levels is None:
            return None
        return [self.level_weights(), *inner_levels]

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.activations.items() if v != DEFAULT_ACTIVATIONS[k]}
        options = "".join(f", {k}={v!r}" for k, v in changed.items())
        return f"hidden_size={self.hidden_size}, bias={self.bias}{options}"
