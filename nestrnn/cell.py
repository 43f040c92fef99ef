"""NestedLSTMCell: one step of a Nested LSTM, the counterpart of ``torch.nn.LSTMCell``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestrnn.arguments import check_bool, check_int
from nestrnn.init import (
    add_layer_norm_parameters,
    add_lstm_parameters,
    check_init_options,
    init_layer_norm,
    init_lstm_level,
    layer_norm_flags,
    layer_norm_parameters,
    split_layer_norm,
)
from nestrnn.memory.build import MemorySpec, build_memory, inherited_options, place_memory
from nestrnn.ops.common.levels import LevelWeights
from nestrnn.ops.common.reference import zoneout_mix
from nestrnn.ops.outer_lstm.naive import outer_step
from nestrnn.regularisers import check_rate, level_rates, zoneout_weights
from nestrnn.state import check_input, check_state, initial_cells, memory_spec_for_depth


class NestedLSTMCell(nn.Module):
    """One step of a Nested LSTM; with ``depth=1`` exactly ``nn.LSTMCell``.

    Args: ``input_size, hidden_size, bias, device, dtype`` as in ``nn.LSTMCell``, in the same
    positions; keyword-only ``depth``, ``memory``, ``forget_bias``, ``recurrent_init``,
    ``zoneout_cell``, ``zoneout_hidden`` and ``layer_norm`` as in :class:`nestrnn.NestedLSTM`
    (zoneout works with any memory function here: each of its states is a cell; layer
    normalisation needs nested levels that have it, ``NestedMemory``). Weight drop and locked dropout draw
    one mask per sequence, which a single step cannot know: they are options of the layer.

    Inputs: ``input`` (N, H_in) or (H_in,), ``hx = (h, c)`` or None: h (N, H); c (N, H) when
    ``depth == 1``, else (depth, N, H). Unbatched: drop N. ``zoneout``: keep-previous weights
    (depth + 1, N, H) to use instead of drawing them (rows 0..depth-1 for the cells, the last for
    h), e.g. the masks a layer drew (``nestrnn.regularisers.zoneout_weights``).
    Outputs: ``(h', c')`` of the same shapes.

    Parameters ``weight_ih`` (4H, H_in), ``weight_hh`` (4H, H), ``bias_ih``, ``bias_hh`` (4H,),
    with ``layer_norm`` on the outer level ``layer_norm_gates_weight``, ``layer_norm_gates_bias``
    (4H,), ``layer_norm_cell_weight``, ``layer_norm_cell_bias`` (H,); the memory function is the
    submodule ``memory``.
    """

    # registered by add_lstm_parameters; declared for the type checker
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        depth: int | None = None,
        memory: MemorySpec | None = None,
        forget_bias: float | None = 1.0,
        recurrent_init: str = "orthogonal",
        zoneout_cell: float | Sequence[float] = 0.0,
        zoneout_hidden: float = 0.0,
        layer_norm: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__()
        check_int(input_size, "input_size")
        check_int(hidden_size, "hidden_size")
        check_bool(bias, "bias")
        check_init_options(forget_bias, recurrent_init)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.forget_bias, self.recurrent_init = forget_bias, recurrent_init
        add_lstm_parameters(self, "", input_size, hidden_size, bias, device=device, dtype=dtype)
        spec = memory_spec_for_depth(depth) if memory is None else memory
        inherited = inherited_options(bias, forget_bias, recurrent_init, device, dtype)
        if memory is None:  # the depth is known: say so before the memory would
            layer_norm_flags(layer_norm, 2 if depth is None else depth)
        outer_norm, below_norm = split_layer_norm(layer_norm)
        if below_norm:  # for the memories that take it (the nested levels)
            inherited["layer_norm"] = below_norm
        self.memory = place_memory(build_memory(spec, hidden_size, inherited), device, dtype)
        if outer_norm:
            add_layer_norm_parameters(self, "", hidden_size, device, dtype)
        self.num_cells = 1 + self.memory.num_states
        if depth is not None and memory is not None and depth != self.num_cells:
            raise ValueError(
                f"depth={depth} does not match the memory given, which has {self.num_cells} levels"
            )
        self.depth = self.num_cells
        self.zoneout_cell = level_rates(zoneout_cell, self.depth, "zoneout_cell")
        self.zoneout_hidden = check_rate(zoneout_hidden, "zoneout_hidden")
        self.layer_norm = layer_norm_flags(layer_norm, self.depth)
        self._check_layer_norm()
        self.reset_parameters()

    def _check_layer_norm(self) -> None:
        """The memory's levels must have the normalisation asked for."""
        if not any(self.layer_norm[1:]):
            return
        norms = self.memory.fused_norms()
        found = None if norms is None else tuple(n is not None for n in norms)
        if found != self.layer_norm[1:]:
            raise ValueError(
                f"layer_norm={list(self.layer_norm)!r} but {type(self.memory).__name__}'s levels "
                f"have layer normalisation {found if found is None else list(found)!r}; make "
                "them agree"
            )

    def reset_parameters(self) -> None:
        init_lstm_level(*self._weights(), self.forget_bias, self.recurrent_init)
        norms = layer_norm_parameters(self, "")
        if norms is not None:
            init_layer_norm(norms, self.forget_bias)
        self.memory.reset_parameters()

    def _weights(self) -> LevelWeights:
        return LevelWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def forward(
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        zoneout: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        check_input(input, (1, 2), self.input_size, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            batch, dtype, device = x.shape[0], x.dtype, x.device
            h0 = torch.zeros(batch, self.hidden_size, dtype=dtype, device=device)
            c0 = initial_cells(self.memory, batch, self.hidden_size, dtype, device)
        else:
            h0, c0 = check_state(
                hx,
                batched,
                (),
                x.shape[0],
                self.hidden_size,
                self.hidden_size,
                self.num_cells,
                self.weight_ih,
            )
        h, cells = outer_step(
            F.linear(x, self.weight_ih, self.bias_ih),
            h0,
            tuple(c0.unbind(0)),
            self._weights(),
            self.memory,
            self.memory.outer_candidate_activation,
            norms=layer_norm_parameters(self, ""),
        )
        if zoneout is None:
            drawn = zoneout_weights(
                self.zoneout_cell,
                self.zoneout_hidden,
                1,
                x.shape[0],
                self.hidden_size,
                self.training,
                x,
            )
            zoneout = None if drawn is None else drawn[:, 0]
        if zoneout is not None:
            h = zoneout_mix(h0, h, zoneout[-1])
            cells = tuple(zoneout_mix(c0[k], c, zoneout[k]) for k, c in enumerate(cells))
        c = torch.stack(cells)
        if self.num_cells == 1:
            c = c.squeeze(0)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(-2)
        return h, c

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, bias={self.bias}, depth={self.depth}"
        if any(self.layer_norm):
            flags = self.layer_norm
            s += f", layer_norm={True if all(flags) else list(flags)!r}"
        return s
