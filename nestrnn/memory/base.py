"""The memory-function interface.

An LSTM updates its cell additively: ``c_t = f_t * c_{t-1} + i_t * g_t``. A memory function
generalises that update to ``c_t = m(f_t * c_{t-1}, i_t * g_t, state)``: the outer LSTM computes its
gates as usual and hands the two gated terms to ``m``, which returns the new outer cell and its own
new state. An additive ``m`` gives a plain LSTM; an ``m`` that is itself an LSTM gives a Nested LSTM.

Writing your own
----------------
Subclass :class:`MemoryFunction` (an ``nn.Module``) and

* take ``hidden_size`` as the first constructor argument; declare parameters as usual
  (``nn.Parameter`` attributes or submodules) and initialise them in ``reset_parameters``;
* set ``num_states``: how many extra ``(batch, hidden_size)`` tensors the function carries from
  step to step (0 for a stateless function). The outer layer stores them after its own cell, so a
  layer's cell state has ``1 + num_states`` entries, and returns and accepts them all;
* set ``outer_candidate_activation``: the activation the level above (the outer LSTM, or a nested
  level) applies to its candidate ``g`` before forming ``i * g`` ("tanh" for an LSTM; the paper's
  Nested LSTM uses "identity");
* implement ``forward(gated_cell, gated_input, state) -> (cell, new_state)``;
* optionally override ``init_state``: the state a sequence starts from when the caller gives
  none (zeros by default).

Store activation *names* (strings), never function objects, as attributes: a model then pickles
to plain data and loads with ``torch.load(weights_only=True)``.

Register it with :func:`nestrnn.register_memory` (in a script) or the ``register_memories`` plugin hook
(in an installed package), and check it with :mod:`nestrnn.testing`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from nestrnn.arguments import check_int
from nestrnn.ops.common.levels import LevelActivations, LevelNorms, LevelWeights

State = tuple[Tensor, ...]
FusedLevel = tuple[LevelWeights, LevelActivations]


class MemoryFunction(nn.Module, ABC):
    """Base class of every memory function ``c_t = m(f_t * c_{t-1}, i_t * g_t, state)``."""

    #: number of extra (batch, hidden_size) state tensors carried between steps
    num_states: int = 0
    #: activation the level above applies to its candidate g (a name from nestrnn.activations)
    outer_candidate_activation: str = "tanh"

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        check_int(hidden_size, "hidden_size")
        self.hidden_size = hidden_size

    @abstractmethod
    def forward(
        self, gated_cell: Tensor, gated_input: Tensor, state: State
    ) -> tuple[Tensor, State]:
        """Compute the new outer cell.

        Args:
            gated_cell: ``f_t * c_{t-1}``, shape (B, H).
            gated_input: ``i_t * g_t``, shape (B, H).
            state: ``num_states`` tensors of shape (B, H), this function's state after step t-1.

        Returns:
            ``(c_t, new_state)``: the new outer cell (B, H) and ``num_states`` tensors (B, H).
        """

    def reset_parameters(self) -> None:
        """(Re)initialise parameters; the default does nothing."""

    def init_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> State:
        """The state a new sequence starts from when the caller gives none: ``num_states``
        tensors of shape (B, H), zeros by default."""
        return tuple(
            torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device)
            for _ in range(self.num_states)
        )

    def fused_levels(self) -> list[FusedLevel] | None:
        """The levels below the outer LSTM, with their activations, when the fused op can run
        this function.

        That is a chain of zero or more :class:`NestedMemory` levels (any activations, with or
        without biases) ending in :class:`AdditiveMemory`, none with a ``forward`` of its own. The
        layer runs those through the whole-sequence op of :mod:`nestrnn.ops.nested_lstm`; any other
        function returns None and runs step by step through its ``forward``.
        """
        return None

    def fused_norms(self) -> list[LevelNorms | None] | None:
        """The layer normalisation of each level of :meth:`fused_levels` (None for a level
        without), or None where ``fused_levels`` is None. The default: no level normalises."""
        levels = self.fused_levels()
        return None if levels is None else [None] * len(levels)
