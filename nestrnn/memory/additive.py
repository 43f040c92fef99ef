"""The additive memory function: a plain LSTM's cell update."""

from __future__ import annotations

from torch import Tensor

from nestrnn.memory.base import MemoryFunction, State
from nestrnn.ops.nested_lstm.common import LevelWeights


class AdditiveMemory(MemoryFunction):
    """``c_t = f_t * c_{t-1} + i_t * g_t``: with this memory the outer layer is an ``nn.LSTM``."""

    num_states = 0
    outer_candidate_activation = "tanh"

    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        return gated_cell + gated_input, ()

    def fused_levels(self) -> list[LevelWeights] | None:
        return [] if type(self).forward is AdditiveMemory.forward else None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"
