"""The outer LSTM around any memory function: one direction of one layer over a whole sequence.

``outer_lstm`` is the entry point (the generic path of ``NestedLSTM``): ``stepwise.py`` where it
applies (CPU, float32/float64, the CPU kernel built), else ``naive.py``, the reference both are
tested against.

Under ``torch.compile`` the time loop is not traced (it would be unrolled, and compiled again for
every sequence length): it runs as a graph break, and the memory function's step is compiled
instead, once. ``torch.export`` records the naive steps, unrolled for the sequence length given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nestrnn.ops.nested_lstm.layout import LevelWeights, autocast_dtype
from nestrnn.ops.outer_lstm import stepwise
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
    """One direction of one layer (shapes as in ``naive.py``). Under ``torch.autocast`` the
    results are in the autocast dtype, as nn.LSTM's and the whole-sequence op's are."""
    args = (x, weights, memory, h0, c0, batch_sizes, reverse, candidate_activation)
    if torch.compiler.is_exporting():  # an exported graph holds the naive steps, unrolled
        results = outer_lstm_naive(*args)
    elif torch.compiler.is_compiling():
        results = _graph_break()(*args, True)
    else:
        results = _run(*args, False)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        results = tuple(t.to(dtype) for t in results)
    return results


def _graph_break():
    """``_run`` as a graph break for torch.compile (made on first use: ``torch.compiler.disable``
    imports the compiler, which ``import nestrnn`` should not)."""
    global _disabled_run
    if _disabled_run is None:
        _disabled_run = torch.compiler.disable(_run)
    return _disabled_run


_disabled_run = None


def _run(x, weights, memory, h0, c0, batch_sizes, reverse, candidate, compile_step: bool):
    step = stepwise.compiled_step(memory) if compile_step else memory
    path = (
        stepwise.outer_lstm_stepwise if stepwise.applies(x, weights, h0, c0) else outer_lstm_naive
    )
    return path(x, weights, step, h0, c0, batch_sizes, reverse, candidate)
