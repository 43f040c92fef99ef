"""The nested memory function: an inner LSTM computes the outer cell (Moniz & Krueger, 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nestrnn.activations import check_activation
from nestrnn.arguments import check_bool, check_int
from nestrnn.init import (
    add_layer_norm_parameters,
    add_lstm_parameters,
    check_init_options,
    init_layer_norm,
    init_lstm_level,
    layer_norm_parameters,
)
from nestrnn.memory.base import FusedLevel, MemoryFunction, State
from nestrnn.memory.build import build_memory, inherited_options
from nestrnn.ops.common.levels import LevelActivations, LevelNorms, LevelWeights
from nestrnn.ops.common.reference import nested_level_step

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

    With ``layer_norm`` the gate blocks are layer-normalised before their activations and
    ``c_inner`` before ``cell_activation`` (it is carried unnormalised).

    (``nested_level_step`` of ``nestrnn/ops/common/reference.py``, the one definition of a level.)

    Parameters are named like ``nn.LSTMCell``: ``weight_ih`` (4H, H), ``weight_hh`` (4H, H),
    ``bias_ih``, ``bias_hh`` (4H,). State: this level's cell followed by ``inner``'s state.

    Args:
        hidden_size: H.
        depth: memory levels of a layer that uses this function, counting the outer LSTM: 2 means
            one nested level with an additive inner update (the paper's model), 3 nests once more.
            Ignored when ``inner`` is given.
        inner: the inner memory: a MemoryFunction, a registered name or a ``{"name": ...}`` dict.
            It is given this level's ``candidate_activation`` as its
            ``outer_candidate_activation`` (a given instance must already agree).
        bias: whether this level (and levels built from ``depth``) have biases.
        forget_bias: initial forget-gate bias (None: PyTorch's uniform initialisation).
        recurrent_init: "orthogonal" (default) or "uniform" for ``weight_hh``.
        gate_activation, candidate_activation, cell_activation: this level's activations (names
            from ``nestrnn.activations``); levels built from ``depth`` share them.
        outer_candidate_activation: what the level above applies to its candidate g (the paper: the
            identity when nested).
        layer_norm: layer normalisation of this level (a bool, which levels built from ``depth``
            share) or of this level and each built below it (``depth - 1`` bools). Its parameters
            ``layer_norm_gates_weight``, ``layer_norm_gates_bias`` (4H,),
            ``layer_norm_cell_weight``, ``layer_norm_cell_bias`` (H,) exist only where it is on.
        device, dtype: of the parameters.
    """

    # registered by add_lstm_parameters; declared for the type checker
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layer_norm: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(hidden_size)
        check_int(depth, "depth of a nested memory", minimum=2)
        own, below_norm = _split_layer_norm(layer_norm, depth, inner is None)
        check_bool(bias, "bias")
        check_init_options(forget_bias, recurrent_init)
        self.activations = {
            "gate_activation": gate_activation,
            "candidate_activation": candidate_activation,
            "cell_activation": cell_activation,
            "outer_candidate_activation": outer_candidate_activation,
        }
        for argument, name in self.activations.items():
            check_activation(name, argument)
        self.outer_candidate_activation = outer_candidate_activation
        self.bias = bias
        self.forget_bias = forget_bias
        self.recurrent_init = recurrent_init

        inherited = inherited_options(bias, forget_bias, recurrent_init, device, dtype)
        below: dict[str, Any] = {"outer_candidate_activation": candidate_activation}
        if below_norm:  # only a level that can normalise is asked to
            below["layer_norm"] = below_norm
        if inner is None and depth > 2:
            levels: dict[str, Any] = {
                k: v for k, v in self.activations.items() if k != "outer_candidate_activation"
            }
            inner = type(self)(hidden_size, depth - 1, **inherited, **levels, **below)
        self.inner = build_memory(
            "additive" if inner is None else inner, hidden_size, {**inherited, **below}
        )
        if self.inner.outer_candidate_activation != candidate_activation:
            raise ValueError(
                f"the inner memory expects its outer level's candidate activation to be "
                f"{self.inner.outer_candidate_activation!r}, but this level's "
                f"candidate_activation is {candidate_activation!r}; make them agree"
            )
        self.num_states = 1 + self.inner.num_states
        add_lstm_parameters(self, "", hidden_size, hidden_size, bias, device=device, dtype=dtype)
        self.layer_norm = own
        if own:
            add_layer_norm_parameters(self, "", hidden_size, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_lstm_level(*self.level_weights(), self.forget_bias, self.recurrent_init)
        norms = self.level_norms()
        if norms is not None:
            init_layer_norm(norms, self.forget_bias)
        self.inner.reset_parameters()

    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        inner_state = tuple(state[1:])

        def update(cell: Tensor, input: Tensor) -> tuple[Tensor, State]:
            return self.inner(cell, input, inner_state)

        weights, activations = self.level_weights(), self.level_activations()
        return nested_level_step(
            gated_cell, gated_input, state[0], weights, activations, update, self.level_norms()
        )

    def level_weights(self) -> LevelWeights:
        return LevelWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def level_norms(self) -> LevelNorms | None:
        """This level's layer normalisation, or None without."""
        return layer_norm_parameters(self, "")

    def level_activations(self) -> LevelActivations:
        a = self.activations
        return LevelActivations(
            a["gate_activation"], a["candidate_activation"], a["cell_activation"]
        )

    def fused_levels(self) -> list[FusedLevel] | None:
        # a subclass that changes ``forward`` must not inherit the fast path silently
        if type(self).forward is not NestedMemory.forward:
            return None
        inner_levels = self.inner.fused_levels()
        if inner_levels is None:
            return None
        return [(self.level_weights(), self.level_activations()), *inner_levels]

    def fused_norms(self) -> list[LevelNorms | None] | None:
        inner_norms = self.inner.fused_norms()
        if inner_norms is None or self.fused_levels() is None:
            return None
        return [self.level_norms(), *inner_norms]

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.activations.items() if v != DEFAULT_ACTIVATIONS[k]}
        options = "".join(f", {k}={v!r}" for k, v in changed.items())
        norm = ", layer_norm=True" if self.layer_norm else ""
        return f"hidden_size={self.hidden_size}, bias={self.bias}{options}{norm}"


def _split_layer_norm(
    layer_norm: Any, depth: int, builds_inner: bool
) -> tuple[bool, bool | tuple[bool, ...]]:
    """This level's flag and what the level below is given (False: nothing)."""
    if isinstance(layer_norm, Sequence) and not isinstance(layer_norm, str):
        flags = tuple(layer_norm)
        levels = depth - 1 if builds_inner else len(flags)
        if not flags or len(flags) != levels:
            raise ValueError(
                f"layer_norm of a nested memory needs one bool per nested level ({levels}), "
                f"got {list(flags)!r}"
            )
        for k, flag in enumerate(flags):
            check_bool(flag, f"layer_norm[{k}]")
        rest = flags[1:]
        return flags[0], rest if any(rest) else False
    check_bool(layer_norm, "layer_norm")
    return layer_norm, layer_norm
