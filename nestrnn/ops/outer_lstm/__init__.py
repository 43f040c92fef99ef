"""The outer LSTM around any memory function: one direction of one layer over a whole sequence.

``outer_lstm`` is the entry point (the generic path of ``NestedLSTM``): ``stepwise.py`` where it
applies (CPU, float32/float64, the CPU kernel built), else ``naive.py``, the reference both are
tested against.

Under ``torch.compile`` the time loop is not traced (it would be unrolled, and compiled again for
every sequence length): it runs as a graph break, and the memory function's step is compiled
instead, once (so ``fullgraph=True`` is refused, with ``FULLGRAPH_MESSAGE``). ``torch.export`` records the naive steps, unrolled for the sequence length given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from nestrnn.ops.common.levels import LevelWeights, autocast_dtype
from nestrnn.ops.outer_lstm import stepwise
from nestrnn.ops.outer_lstm.naive import outer_lstm_naive

if TYPE_CHECKING:
    from nestrnn.memory.base import MemoryFunction

__all__ = ["outer_lstm", "outer_lstm_naive"]

FULLGRAPH_MESSAGE = (
    "NestedLSTM with a user memory function cannot be compiled with fullgraph=True: its time loop "
    "is a graph break; use torch.compile without fullgraph (the step is compiled once)"
)


def outer_lstm(
    x: Tensor,
    weights: LevelWeights,
    memory: MemoryFunction,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
    candidate_activation: str = "tanh",
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one layer (shapes as in ``naive.py``; ``weight_hr``: nn.LSTM's projection). Under ``torch.autocast`` the
    results are in the autocast dtype, as nn.LSTM's and the whole-sequence op's are."""
    args = (x, weights, memory, h0, c0, batch_sizes, reverse, candidate_activation)
    if torch.compiler.is_exporting():  # an exported graph holds the naive steps, unrolled
        results = outer_lstm_naive(*args, weight_hr)
    elif torch.compiler.is_compiling():
        # fullgraph=True cannot hold this graph break: dynamo raises, with this message rather than
        # its own (about torch.compiler.disable, to be filed as a PyTorch issue)
        torch._dynamo.graph_break(msg=FULLGRAPH_MESSAGE)
        results = _graph_break()(*args, weight_hr, True)
    else:
        results = _run(*args, weight_hr, False)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        results = cast(tuple[Tensor, Tensor, Tensor], tuple(t.to(dtype) for t in results))
    return results


def _graph_break():
    """``_run`` as a graph break for torch.compile (made on first use: ``torch.compiler.disable``
    imports the compiler, which ``import nestrnn`` should not)."""
    global _disabled_run
    if _disabled_run is None:
        _disabled_run = torch.compiler.disable(_run)
    return _disabled_run


_disabled_run = None


def _run(
    x, weights, memory, h0, c0, batch_sizes, reverse, candidate, weight_hr, compile_step: bool
):
    step = stepwise.compiled_step(memory) if compile_step else memory
    if weight_hr is not None:  # the fast path has no projection
        return outer_lstm_naive(
            x, weights, step, h0, c0, batch_sizes, reverse, candidate, weight_hr
        )
    path = (
        stepwise.outer_lstm_stepwise if stepwise.applies(x, weights, h0, c0) else outer_lstm_naive
    )
    return path(x, weights, step, h0, c0, batch_sizes, reverse, candidate)
