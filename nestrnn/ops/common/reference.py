"""The reference definition of the cell: one LSTM level's step, and the nested cell's step built
from it (outer gates -> inner levels -> cell back up -> h), in plain PyTorch calls under autograd.

Everything that steps the cell in Python calls these functions: the memory function of a nested
level (``NestedMemory.forward``), ``NestedLSTMCell`` and the generic path's reference
(``ops/outer_lstm/naive.py``: ``outer_step``), the whole-sequence reference
(``ops/nested_lstm/naive.py``) and the body of the export decomposition's scan
(``ops/nested_lstm/decompose.py``). The fast implementations (C, C++, Triton, the PyTorch loop of
``torch_loop.py``) are tested against it. The activations are looked up by name in
``nestrnn.activations.ACTIVATIONS``; ``ACTIVATIONS_INPLACE`` is the same table in place, for loops
that activate their gate buffers where they lie.

Shapes: B batch, I input size, H hidden size, D memory levels (the outer LSTM is level 0); gates
are in ``nn.LSTM``'s order (i, f, g, o) along every 4H axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from nestrnn.activations import ACTIVATIONS
from nestrnn.ops.common.levels import (
    LevelActivations,
    LevelNorms,
    LevelWeights,
    normalise_cell,
    normalise_gates,
)

#: a level's cell update: (f * c_{t-1}, i * g), each (B, H) -> (the level's new cell (B, H), the
#: state of the levels below it, each (B, H))
CellUpdate = Callable[[Tensor, Tensor], tuple[Tensor, tuple[Tensor, ...]]]


def _softsign_(t: Tensor) -> Tensor:
    return t.div_(t.abs().add_(1))


def _identity_(t: Tensor) -> Tensor:
    return t


def _hardtanh_(t: Tensor) -> Tensor:
    return t.clamp_(-1, 1)


#: the activations whose in-place form is not the Tensor method ``<name>_``
_INPLACE_SPECIAL = {"identity": _identity_, "hardtanh": _hardtanh_, "softsign": _softsign_}

#: name -> the activation in place (``t = act(t)``, returning t), for every name of ACTIVATIONS
ACTIVATIONS_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {
    name: _INPLACE_SPECIAL.get(name) or getattr(Tensor, f"{name}_") for name in ACTIVATIONS
}


def additive(gated_cell: Tensor, gated_input: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The innermost level's update, an LSTM's: ``c = f * c_{t-1} + i * g``; no state below."""
    return gated_cell + gated_input, ()


def level_step(
    projected_input: Tensor,
    hidden: Tensor,
    cell: Tensor,
    weights: LevelWeights,
    activations: LevelActivations,
    update: CellUpdate,
    norms: LevelNorms | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of one LSTM level whose cell update is ``update``::

        z = projected_input + W_hh hidden + b_hh
        z = LN_gates(z)                        with norms: each gate block normalised on its own
        i, f, g, o = split(z)
        i, f, o = gate(.);  g = candidate(g)
        c, below = update(f * cell, i * g)
        return o * cell_activation(c or LN_cell(c)), (c, *below)

    Args:
        projected_input: ``W_ih x + b_ih`` (B, 4H) of the level's input x.
        hidden: the level's previous hidden state (B, H), or (B, P) at level 0 with a projection
            (then ``weights.weight_hh`` is (4H, P)).
        cell: the level's previous cell (B, H).
        weights: only ``weight_hh`` and ``bias_hh`` are read here.
        norms: the level's layer normalisation, or None (none).
    Returns:
        the level's output (B, H) and its new state: its cell, then ``update``'s state.
    """
    gates = projected_input + F.linear(hidden, weights.weight_hh, weights.bias_hh)
    if norms is not None:
        gates = normalise_gates(gates, norms)
    i, f, g, o = gates.chunk(4, dim=1)
    gate = ACTIVATIONS[activations.gate]
    i, f, o = gate(i), gate(f), gate(o)
    g = ACTIVATIONS[activations.candidate](g)
    new_cell, below = update(f * cell, i * g)
    shown = new_cell if norms is None else normalise_cell(new_cell, norms)  # carried unnormalised
    return o * ACTIVATIONS[activations.cell](shown), (new_cell, *below)


def nested_level_step(
    gated_cell: Tensor,
    gated_input: Tensor,
    cell: Tensor,
    weights: LevelWeights,
    activations: LevelActivations,
    update: CellUpdate,
    norms: LevelNorms | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of a nested level, the cell update of the level above: its input is
    ``x~ = i * g`` and its previous hidden state ``h~ = f * c_{t-1}`` of the level above (each
    (B, H)); ``weights.weight_ih`` is (4H, H). Returns the level above's new cell (B, H), then
    this level's cell and ``update``'s state."""
    projected = F.linear(gated_input, weights.weight_ih, weights.bias_ih)
    return level_step(projected, gated_cell, cell, weights, activations, update, norms)


def zoneout_mix(previous: Tensor, new: Tensor, keep: Tensor) -> Tensor:
    """Zoneout of one carried state: ``keep * previous + (1 - keep) * new``, elementwise.
    ``keep`` is 0/1 (a training mask: 1 keeps the previous value) or the rate itself (evaluation,
    the expectation); at 0 the new value passes exactly, at 1 the previous one."""
    return keep * previous + (1 - keep) * new


def nested_cell_step(
    x_t: Tensor,
    h: Tensor,
    cells: Sequence[Tensor],
    weights: Sequence[LevelWeights],
    activations: Sequence[LevelActivations],
    weight_hr: Tensor | None = None,
    zoneout: Sequence[Tensor] | None = None,
    norms: Sequence[LevelNorms | None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """One step of the whole nested cell: level 0's gates from ``x_t`` and ``h``, each level
    k >= 1 the cell update of level k - 1, the innermost level additive (``additive``).

    With ``zoneout`` (D + 1 keep weights, each shaped as the state it mixes: the D cells', then
    h's), the step itself runs on the unzoned new values (each level's output reads its new cell
    as computed), and what is returned (carried to the next step, and h the output) is each state
    mixed with its previous value by :func:`zoneout_mix`.

    Args:
        x_t: (B, I).
        h: (B, H), or (B, P) with ``weight_hr``.
        cells: D x (B, H), the cell of each level.
        weights: D levels; level 0's ``weight_ih`` is (4H, I), the others' (4H, H).
        activations: D levels.
        weight_hr: (P, H), nn.LSTM's projection of h, or None.
        zoneout: D + 1 keep weights or None (no zoneout).
        norms: D levels' layer normalisation (None for a level without), or None (none at all).
    Returns:
        h_t (B, H) or (B, P), and the D new cells (B, H).
    """

    level_norms = list(norms) if norms is not None else [None] * len(weights)

    def update_of(k: int) -> CellUpdate:
        """Level k as the cell update of level k - 1."""
        if k == len(weights):
            return additive
        return lambda gated_cell, gated_input: nested_level_step(
            gated_cell,
            gated_input,
            cells[k],
            weights[k],
            activations[k],
            update_of(k + 1),
            level_norms[k],
        )

    outer = weights[0]
    projected = F.linear(x_t, outer.weight_ih, outer.bias_ih)
    h_new, new_cells = level_step(
        projected, h, cells[0], outer, activations[0], update_of(1), level_norms[0]
    )
    if weight_hr is not None:
        h_new = F.linear(h_new, weight_hr)
    if zoneout is None:
        return h_new, list(new_cells)
    carried = [zoneout_mix(old, new, z) for old, new, z in zip(cells, new_cells, zoneout)]
    return zoneout_mix(h, h_new, zoneout[len(weights)]), carried
