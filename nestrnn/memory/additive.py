"""The additive memory function: a plain LSTM's cell update."""

from __future__ import annotations

from torch import Tensor

from nestrnn.activations import check_activation
from nestrnn.memory.base import FusedLevel, MemoryFunction, State


class AdditiveMemory(MemoryFunction):
    """``c_t = f_t * c_{t-1} + i_t * g_t``: with this memory the outer layer is an ``nn.LSTM``.

    Args:
        hidden_size: H.
        outer_candidate_activation: the activation the level above applies to its candidate g
            ("tanh", as in an LSTM).
    """

    num_states = 0

    def __init__(self, hidden_size: int, outer_candidate_activation: str = "tanh") -> None:
        super().__init__(hidden_size)
        check_activation(outer_candidate_activation, "outer_candidate_activation")
        self.outer_candidate_activation = outer_candidate_activation

    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        return gated_cell + gated_input, ()

    def fused_levels(self) -> list[FusedLevel] | None:
        return [] if type(self).forward is AdditiveMemory.forward else None

    def extra_repr(self) -> str:
        extra = ""
        if self.outer_candidate_activation != "tanh":
            extra = f", outer_candidate_activation={self.outer_candidate_activation!r}"
        return f"hidden_size={self.hidden_size}{extra}"
