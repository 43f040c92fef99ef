"""Types and checks shared by every version of the nested-LSTM op."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LevelWeights(NamedTuple):
    """The four parameters of one LSTM level, named as in ``torch.nn.LSTMCell``.

    weight_ih (4H, I or H), weight_hh (4H, H), bias_ih and bias_hh (4H,) or None.
    Gate order along the 4H axis is nn.LSTM's: i, f, g, o.
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None


def time_order(steps: int, reverse: bool) -> range:
    """Step indices in processing order."""
    return range(steps - 1, -1, -1) if reverse else range(steps)
