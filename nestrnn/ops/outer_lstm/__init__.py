"""The outer LSTM around any memory function: one direction of one layer over a whole sequence.

``outer_lstm`` is the entry point (the generic path of ``NestedLSTM``); ``naive.py`` is the
reference it is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from nestrnn.ops.nested_lstm.layout import LevelWeights
from nestrnn.ops.outer_lstm.naive import outer_lstm_naive

if TYPE_CHECKING:
    from nestrnn.memory.base import MemoryFunction

__all__ = ["outer_lstm", "outer_lstm_naive"]


def outer_lstm(
    x: Tensor,
    weights: LevelWeights,
    memory: MemoryFunction,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    candidate_activation: str = "tanh",
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer (shapes as in ``naive.py``)."""
    return outer_lstm_naive(x, weights, memory, h0, c0, batch_sizes, reverse, candidate_activation)
