"""The recurrent regularisers of RNN language-model recipes, each defined once here and applied by
the layer (``NestedLSTM``), the cell (``NestedLSTMCell``) and the model heads:

* weight drop (DropConnect on the hidden-to-hidden weights, AWD-LSTM's ``WeightDrop``): one mask
  per forward call, applied to the weight before the recurrent op runs, so every implementation of
  the op keeps its speed;
* locked (variational) dropout: one mask per sequence, shared by every time step;
* zoneout: per unit and per step, a recurrent state keeps its previous value with probability p;
  the masks are built here and mixed in by the op's time loops (``zoneout_mix`` in
  ``ops/common/reference.py`` is the formula), the expectation ``p`` in evaluation;
* segment recomputation (activation checkpointing of the time loop): the backward recomputes
  segments of ``every`` steps from the saved boundary states, so training memory does not grow
  with the sequence length beyond the layer's outputs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: a recurrent pass over a segment: (x (T', B, I), h (B, H), cells (D, B, H), batch sizes (T',)
#: or None, zoneout (D + 1, T', B, H) or None) -> (output (T', B, H), h, cells)
SegmentRun = Callable[
    [Tensor, Tensor, Tensor, Tensor | None, Tensor | None], tuple[Tensor, Tensor, Tensor]
]


def check_rate(value: Any, name: str) -> float:
    """A dropout-like probability in [0, 1); returns it as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= float(value) < 1:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def level_rates(value: Any, depth: int, name: str) -> tuple[float, ...]:
    """One rate per memory level (level 0 is the outer LSTM) from a number (every level) or a
    sequence of ``depth`` numbers."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != depth:
            raise ValueError(
                f"{name} needs one rate per memory level ({depth}), got {len(value)}: "
                f"{list(value)!r}; give one number for every level"
            )
        return tuple(check_rate(v, f"{name}[{k}]") for k, v in enumerate(value))
    return (check_rate(value, name),) * depth


def keep_mask(shape: Sequence[int], rate: float, like: Tensor) -> Tensor:
    """A 0/1 mask of ``shape`` in ``like``'s dtype and device, 0 with probability ``rate``.

    Every mask here is drawn from float32 uniforms whatever the dtype, so that from one seed a
    model in any precision draws the same masks (torch's own dropout draws differently per dtype
    on CUDA), and half precision gets no coarse uniforms."""
    uniform = torch.rand(tuple(shape), dtype=torch.float32, device=like.device)
    return (uniform >= rate).to(like.dtype)


def drop_weight(weight: Tensor, rate: float, training: bool) -> Tensor:
    """DropConnect: ``weight`` with each element zeroed with probability ``rate`` and the rest
    scaled by ``1 / (1 - rate)`` in training; ``weight`` itself otherwise."""
    if not training or rate == 0:
        return weight
    return weight * keep_mask(weight.shape, rate, weight) / (1 - rate)


def sequence_dropout(
    x: Tensor, rate: float, training: bool, locked: bool, time_dim: int = 0
) -> Tensor:
    """Dropout of ``x`` (time along ``time_dim``): one mask per sequence, shared by every step,
    when ``locked``; a fresh mask per element otherwise."""
    if not training or rate == 0:
        return x
    shape = list(x.shape)
    if locked:
        shape[time_dim] = 1
    return x * keep_mask(shape, rate, x) / (1 - rate)


def zoneout_weights(
    cell_rates: Sequence[float],
    hidden_rate: float,
    steps: int,
    batch: int,
    hidden: int,
    training: bool,
    like: Tensor,
) -> Tensor | None:
    """The op's ``zoneout`` argument: keep-previous weights (D + 1, T, B, H), rows 0..D-1 for the
    D cells and row D for h; None when every rate is 0.

    Training: 0/1 masks, 1 with probability rate, fresh per step, row and unit. Evaluation: the
    rates themselves (the expectation), expanded along T and B without copying."""
    rates = (*cell_rates, hidden_rate)
    if not any(rates):
        return None
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    if training:  # from float32 uniforms, as keep_mask's
        shape, device = (len(rates), steps, batch, hidden), like.device
        uniform = torch.rand(shape, dtype=torch.float32, device=device)
        values = torch.tensor(rates, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        return (uniform < values).to(dtype)
    values = torch.tensor(rates, dtype=dtype, device=like.device).view(-1, 1, 1, 1)
    return values.expand(-1, 1, 1, hidden).contiguous().expand(-1, steps, batch, hidden)


def run_in_segments(
    run: SegmentRun,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: Tensor | None,
    zoneout: Tensor | None,
    reverse: bool,
    every: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``run`` over x (T, B, I) in segments of ``every`` steps, each under activation
    checkpointing: the forward keeps only each segment's output and final state, and the backward
    recomputes one segment at a time from the state it started from. Exactly ``run(x, ...)``'s
    results and gradients, as ``run`` draws no random numbers (masks arrive as arguments)."""
    pieces = len(range(0, x.shape[0], every))
    # one split each (not a slice per segment): the backward gathers the segments' input
    # gradients into one tensor once, instead of a full-size gradient per segment
    inputs = x.split(every)
    sizes = [None] * pieces if batch_sizes is None else batch_sizes.split(every)
    masks = [None] * pieces if zoneout is None else zoneout.split(every, dim=1)
    outputs: list[Tensor] = [x] * pieces
    h, c = h0, c0
    for n in reversed(range(pieces)) if reverse else range(pieces):
        outputs[n], h, c = checkpoint(
            run, inputs[n], h, c, sizes[n], masks[n], use_reentrant=False, preserve_rng_state=False
        )
    return torch.cat(outputs), h, c
