"""NestedLSTM: a drop-in replacement for ``torch.nn.LSTM`` whose cell update is a memory function."""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

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
from nestrnn.memory.base import MemoryFunction
from nestrnn.memory.build import MemorySpec, build_memory, inherited_options, place_memory
from nestrnn.ops.nested_lstm import (
    BACKENDS,
    LevelActivations,
    LevelNorms,
    LevelWeights,
    nested_lstm,
)
from nestrnn.ops.nested_lstm.naive import nested_lstm_naive
from nestrnn.ops.nested_lstm.projected import projected_nested_lstm
from nestrnn.ops.outer_lstm import outer_lstm
from nestrnn.ops.outer_lstm.naive import outer_lstm_naive
from nestrnn.regularisers import (
    check_rate,
    drop_weight,
    level_rates,
    run_in_segments,
    sequence_dropout,
    zoneout_weights,
)
from nestrnn.state import check_input, check_state, initial_cells, memory_spec_for_depth

#: "generic" runs any memory function step by step (fast outer LSTM), "naive" the references
LAYER_BACKENDS = ("generic", "naive", *BACKENDS)


class NestedLSTM(nn.Module):
    r"""A multi-layer Nested LSTM, with the interface of ``torch.nn.LSTM``.

    Each layer is an LSTM whose cell update ``c_t = f_t * c_{t-1} + i_t * g_t`` is replaced by a
    memory function ``c_t = m(f_t * c_{t-1}, i_t * g_t)``. With ``depth=1`` it is exactly
    ``nn.LSTM`` (same parameter names, loads its state dict); with ``depth=2`` the cell is computed
    by an inner LSTM (the paper's Nested LSTM); ``depth=3`` nests once more, and so on.

    For each element of the input sequence, each layer computes the outer gates (as ``nn.LSTM``)

    .. math::
        \begin{array}{ll}
        i_t = \sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi}) \\
        f_t = \sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf}) \\
        g_t = \phi_g(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg}) \\
        o_t = \sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho}) \\
        c_t = m(f_t \odot c_{t-1},\; i_t \odot g_t) \\
        h_t = o_t \odot \tanh(c_t)
        \end{array}

    where :math:`m` is the memory function: :math:`m(a, b) = a + b` (``depth=1``, ``"additive"``)
    gives ``nn.LSTM`` with :math:`\phi_g = \tanh`. A nested level (``"nested"``, ``depth >= 2``)
    is an LSTM step whose input is :math:`\tilde x_t = i_t \odot g_t` and whose previous hidden
    state is :math:`\tilde h_{t-1} = f_t \odot c_{t-1}`, with its own cell
    :math:`\tilde c` one level down:

    .. math::
        \begin{array}{ll}
        \tilde\imath_t, \tilde f_t, \tilde o_t = \sigma(\tilde W_{i\cdot} \tilde x_t
            + \tilde b_{i\cdot} + \tilde W_{h\cdot} \tilde h_{t-1} + \tilde b_{h\cdot}) \\
        \tilde g_t = \tanh(\tilde W_{ig} \tilde x_t + \tilde b_{ig}
            + \tilde W_{hg} \tilde h_{t-1} + \tilde b_{hg}) \\
        \tilde c_t = \tilde m(\tilde f_t \odot \tilde c_{t-1},\; \tilde\imath_t \odot \tilde g_t) \\
        c_t = \tilde o_t \odot \tanh(\tilde c_t)
        \end{array}

    :math:`\tilde m` is the next level down (additive at the innermost level), and above a nested
    level the candidate activation :math:`\phi_g` is the identity (the paper's choice). Every
    activation is configurable per level (see :class:`nestrnn.memory.NestedMemory`). With
    ``proj_size > 0``, :math:`h_t = W_{hr}(o_t \odot \tanh(c_t))`. In a multi-layer model the
    input of layer :math:`l \ge 2` is the output :math:`h^{(l-1)}_t` of the layer below, times a
    Bernoulli dropout mask (``dropout``) in training.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
        device, dtype: as in ``torch.nn.LSTM``, in the same positions. With ``proj_size > 0`` the
            outer output (and h) is projected to ``proj_size`` by ``weight_hr_l{k}``.
        depth: memory levels per layer, counting the outer LSTM (default 2 when ``memory`` is not
            given). With ``memory`` given it is optional and, when given, must match it.
        memory: the memory function of every layer and direction: a registered name
            (``"nested"``), a dict ``{"name": "nested", "depth": 3, ...}``, a ``MemoryFunction``
            instance (copied and re-initialised for each further layer/direction) or a callable
            ``factory(hidden_size) -> MemoryFunction``.
        forget_bias: initial forget-gate bias of every level (None: PyTorch's uniform init).
        recurrent_init: ``"orthogonal"`` (default) or ``"uniform"`` recurrent weights.
        backend: ``"auto"`` picks the fastest correct path: the whole-sequence op for additive and
            nested memory chains (any activations; its C time loop on CPU; on CUDA the Triton
            loops, or cuDNN at depth 1 where it measured faster), the generic path for any other
            memory function. ``"generic"`` and ``"naive"`` (the
            step-by-step references) force a path; ``"triton"`` or another implementation
            name of :mod:`nestrnn.ops.nested_lstm.planning` choose the op's implementation.
        layer_norm: layer normalisation inside the cell (Ba et al. 2016), a bool for every memory
            level or one per level: each of a level's gate blocks is normalised before its
            activation, and the new cell before the level's cell activation (it is carried
            unnormalised). Needs an additive or nested memory chain without a projection; the
            outer level's parameters are ``layer_norm_gates_weight_l{k}``,
            ``layer_norm_gates_bias_l{k}`` (4H,), ``layer_norm_cell_weight_l{k}`` and
            ``layer_norm_cell_bias_l{k}`` (H,), a nested level's are on its memory
            (``NestedMemory``); off, the state dict is ``nn.LSTM``'s.

    Inputs: ``input, (h_0, c_0)`` (the state may be omitted or None: zeros, and each memory
    function's ``init_state``)
        * input: (L, N, H_in), (N, L, H_in) with ``batch_first=True``, (L, H_in) unbatched, or a
          ``PackedSequence``.
        * h_0: (D_dir * num_layers, N, H_out) or (D_dir * num_layers, H_out) unbatched, where
          H_out = proj_size or hidden_size.
        * c_0: (D_dir * num_layers, N, H) when ``depth == 1``, else
          (depth, D_dir * num_layers, N, H); ``c_0[k]`` is memory level k (0 is the outer cell).
          Unbatched: drop the N axis.

    Outputs: ``output, (h_n, c_n)``
        * output: (L, N, D_dir * H_out), (N, L, D_dir * H_out) with ``batch_first=True``,
          (L, D_dir * H_out) unbatched, or a ``PackedSequence`` when the input is one: the last
          layer's h_t at every step.
        * h_n: the shape of h_0, the final h of every layer and direction.
        * c_n: the shape of c_0, the final cell of every memory level, layer and direction.

    Attributes:
        weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}, weight_hr_l{k} (and
            ``_reverse``): the outer LSTM's parameters, shaped and named as in ``nn.LSTM``:
            (4H, H_in) for k = 0 else (4H, D_dir * H_out), (4H, H_out), (4H,), (4H,), (P, H).
        memory_l{k} (and ``memory_l{k}_reverse``): layer k's memory function; a nested level has
            ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` and its own memory ``inner``.

    Examples::

        >>> import torch
        >>> from nestrnn import NestedLSTM
        >>> rnn = NestedLSTM(10, 20, num_layers=2, depth=2)
        >>> input = torch.randn(5, 3, 10)
        >>> h0 = torch.zeros(2, 3, 20)
        >>> c0 = torch.zeros(2, 2, 3, 20)  # (depth, num_layers, batch, hidden)
        >>> output, (hn, cn) = rnn(input, (h0, c0))
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]), torch.Size([2, 2, 3, 20]))
    """

    # registered in __init__ (add_lstm_parameters, add_module); declared for the type checker
    weight_ih_l0: Tensor
    memory_l0: MemoryFunction

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        depth: int | None = None,
        memory: MemorySpec | None = None,
        forget_bias: float | None = 1.0,
        recurrent_init: str = "orthogonal",
        backend: str = "auto",
        weight_drop: float | Sequence[float] = 0.0,
        locked_dropout: bool = False,
        input_dropout: float = 0.0,
        output_dropout: float = 0.0,
        zoneout_cell: float | Sequence[float] = 0.0,
        zoneout_hidden: float = 0.0,
        checkpoint_every: int | None = None,
        layer_norm: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__()
        _check_lstm_arguments(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
        )
        if backend not in LAYER_BACKENDS:
            raise ValueError(f"backend must be one of {LAYER_BACKENDS}, got {backend!r}")
        check_init_options(forget_bias, recurrent_init)

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.forget_bias = forget_bias
        self.recurrent_init = recurrent_init
        self.backend = backend

        spec = memory_spec_for_depth(depth) if memory is None else memory
        inherited = inherited_options(bias, forget_bias, recurrent_init, device, dtype)
        if memory is None:  # the depth is known: say so before the memory would
            layer_norm_flags(layer_norm, 2 if depth is None else depth)
        outer_norm, below_norm = split_layer_norm(layer_norm)
        if below_norm:  # for the memories that take it (the nested levels)
            inherited["layer_norm"] = below_norm
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else self._output_size * len(self._suffixes)
            for suffix in self._suffixes:
                name = f"l{layer}{suffix}"
                add_lstm_parameters(
                    self, f"_{name}", layer_input, hidden_size, bias, proj_size, device, dtype
                )
                if isinstance(spec, MemoryFunction) and self.memories():
                    layer_memory = copy.deepcopy(spec)
                    layer_memory.reset_parameters()
                else:
                    layer_memory = build_memory(spec, hidden_size, inherited)
                self.add_module(f"memory_{name}", place_memory(layer_memory, device, dtype))
                if outer_norm:
                    add_layer_norm_parameters(self, f"_{name}", hidden_size, device, dtype)

        self.num_cells = 1 + self.memory_l0.num_states
        if depth is not None and memory is not None and depth != self.num_cells:
            raise ValueError(
                f"depth={depth} does not match the memory given, which has {self.num_cells} "
                "memory levels; leave depth out or make them agree"
            )
        self.depth = self.num_cells
        self.layer_norm = self._check_layer_norm(layer_norm)
        op_backend = backend not in ("auto", "generic", "naive")
        if op_backend and (self.memory_l0.fused_levels() is None or proj_size):
            raise ValueError(
                f"backend={backend!r} runs the whole-sequence op, which covers additive and nested "
                f"memory chains without a projection; {type(self.memory_l0).__name__}"
                f"{' with proj_size' if proj_size else ''} needs backend 'auto' or 'generic'"
            )
        self._set_regularisers(
            weight_drop,
            locked_dropout,
            input_dropout,
            output_dropout,
            zoneout_cell,
            zoneout_hidden,
            checkpoint_every,
        )
        self._init_outer_parameters()

    def _check_layer_norm(self, layer_norm: Any) -> tuple[bool, ...]:
        """The flag of every level, checked against the memories built. With the default
        (False) the nested levels are as the memory has them (a ``NestedMemory`` given with its
        own ``layer_norm``); asked for, they must have it."""
        requested = layer_norm_flags(layer_norm, self.depth)
        norms = self.memory_l0.fused_norms()
        found = None if norms is None else tuple(n is not None for n in norms)
        flags = (False, *found) if layer_norm is False and found is not None else requested
        for memory in self.memories() if found is not None else []:
            have = tuple(n is not None for n in cast(list, memory.fused_norms()))
            if have != flags[1:]:
                raise ValueError(
                    f"layer_norm={list(flags)!r} but the memory's nested levels have layer "
                    f"normalisation {list(have)!r}; make them agree"
                )
        if not any(flags):
            return flags
        name = type(self.memory_l0).__name__
        fused = found is not None and self.backend != "generic"
        if self.proj_size or found is None or (flags[0] and not fused):
            raise ValueError(
                "layer_norm runs inside the whole-sequence op, which covers additive and nested "
                f"memory chains without a projection; {name}"
                f"{' with proj_size' if self.proj_size else ''} with backend="
                f"{self.backend!r} has no layer normalisation"
            )
        return flags

    def _set_regularisers(
        self,
        weight_drop: float | Sequence[float],
        locked_dropout: bool,
        input_dropout: float,
        output_dropout: float,
        zoneout_cell: float | Sequence[float],
        zoneout_hidden: float,
        checkpoint_every: int | None,
    ) -> None:
        """Check and keep the regularisers' settings (see the class docstring)."""
        check_bool(locked_dropout, "locked_dropout")
        if checkpoint_every is not None:
            check_int(checkpoint_every, "checkpoint_every")
        self.weight_drop = level_rates(weight_drop, self.depth, "weight_drop")
        self.locked_dropout = locked_dropout
        self.input_dropout = check_rate(input_dropout, "input_dropout")
        self.output_dropout = check_rate(output_dropout, "output_dropout")
        self.zoneout_cell = level_rates(zoneout_cell, self.depth, "zoneout_cell")
        self.zoneout_hidden = check_rate(zoneout_hidden, "zoneout_hidden")
        self.checkpoint_every = checkpoint_every
        fused = self.memory_l0.fused_levels() is not None and self.backend != "generic"
        name = type(self.memory_l0).__name__
        if any(self.weight_drop[1:]) and not fused:
            raise ValueError(
                f"weight_drop of the inner levels needs the whole-sequence op or the reference, "
                f"which run additive and nested memory chains; {name} with backend="
                f"{self.backend!r} takes one rate, for the outer weight_hh"
            )
        zoneout = any(self.zoneout_cell) or self.zoneout_hidden
        if zoneout and (not fused or self.proj_size):
            raise ValueError(
                "zoneout runs inside the whole-sequence op, which covers additive and nested "
                f"memory chains without a projection; {name}"
                f"{' with proj_size' if self.proj_size else ''} with backend="
                f"{self.backend!r} has no zoneout"
            )

    # ------------------------------------------------------------------ structure

    @property
    def _suffixes(self) -> list[str]:
        return ["", "_reverse"] if self.bidirectional else [""]

    @property
    def _output_size(self) -> int:
        """Width of h and of each direction's output: proj_size, or hidden_size."""
        return self.proj_size or self.hidden_size

    def memories(self) -> list[MemoryFunction]:
        """Every layer's and direction's memory function, in parameter order."""
        return [m for m in self.children() if isinstance(m, MemoryFunction)]

    def _outer_weights(self, name: str) -> LevelWeights:
        return LevelWeights(
            getattr(self, f"weight_ih_{name}"),
            getattr(self, f"weight_hh_{name}"),
            getattr(self, f"bias_ih_{name}"),
            getattr(self, f"bias_hh_{name}"),
        )

    def _init_outer_parameters(self) -> None:
        for layer in range(self.num_layers):
            for suffix in self._suffixes:
                name = f"l{layer}{suffix}"
                init_lstm_level(
                    *self._outer_weights(name),
                    self.forget_bias,
                    self.recurrent_init,
                    getattr(self, f"weight_hr_{name}", None),
                )
                norms = layer_norm_parameters(self, f"_{name}")
                if norms is not None:
                    init_layer_norm(norms, self.forget_bias)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter, memory functions included."""
        self._init_outer_parameters()
        for memory in self.memories():
            memory.reset_parameters()

    def __setattr__(self, name: str, value: Any) -> None:
        # torch.ao.quantization marks the modules it is asked to quantize with a qconfig, then
        # swaps those its mappings know; this one it would silently leave in float
        if name == "qconfig" and value is not None:
            warnings.warn(
                "NestedLSTM has no quantized version: torch.ao.quantization leaves its weights "
                "in floating point",
                UserWarning,
                stacklevel=2,
            )
        super().__setattr__(name, value)

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.LSTM`` (there is no cuDNN weight buffer here)."""

    # ------------------------------------------------------------------ forward

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        batch_sizes: Tensor | None
        sorted_indices: Tensor | None
        unsorted_indices: Tensor | None
        if isinstance(input, PackedSequence):
            x, batch_sizes, sorted_indices, unsorted_indices = input  # x: the data (N, I)
            check_input(x, (2,), self.input_size, weight, "PackedSequence data")
            batched, batch = True, int(batch_sizes[0]) if len(batch_sizes) else 0
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            check_input(input, (2, 3), self.input_size, weight)
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
            if self.batch_first:
                x = x.transpose(0, 1)
            batch = x.shape[1]
        steps = len(batch_sizes) if batch_sizes is not None else x.shape[0]
        if steps == 0:  # nn.LSTM's error: an empty batch is fine, an empty sequence is not
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is None:
            h0, c0 = self._zero_state(batch, x.dtype, x.device)
        else:
            h0, c0 = check_state(
                hx,
                batched,
                (self.num_layers * len(self._suffixes),),
                batch,
                self._output_size,
                self.hidden_size,
                self.num_cells,
                weight,
            )
            if sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(2, sorted_indices)

        if self._is_torch_lstm():  # takes a packed batch's data as it is
            x, h_out, c_out = self._torch_lstm(x, h0, c0, batch_sizes)
        elif batch_sizes is not None:
            x, _ = pad_packed_sequence(PackedSequence(x, batch_sizes))  # (T, B, I), sorted
            x, h_out, c_out = self._layers(x, h0, c0, batch_sizes)
            lengths = (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)
            x = pack_padded_sequence(x, lengths).data
        else:
            x, h_out, c_out = self._layers(x, h0, c0, batch_sizes)

        if packed:
            output: Tensor | PackedSequence = PackedSequence(
                x, batch_sizes, sorted_indices, unsorted_indices
            )
            if unsorted_indices is not None:
                h_out = h_out.index_select(1, unsorted_indices)
                c_out = c_out.index_select(2, unsorted_indices)
        else:
            output = x.transpose(0, 1) if self.batch_first else x
            if not batched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_out, c_out = h_out.squeeze(1), c_out.squeeze(2)
        if self.num_cells == 1:
            c_out = c_out.squeeze(0)
        return output, (h_out, c_out)

    def _zero_state(
        self, batch: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """h_0 = 0, outer cells = 0 and every memory function's ``init_state``."""
        directions = self.num_layers * len(self._suffixes)
        h0 = torch.zeros(directions, batch, self._output_size, dtype=dtype, device=device)
        per_direction = [
            initial_cells(memory, batch, self.hidden_size, dtype, device)
            for memory in self.memories()
        ]
        return h0, torch.stack(per_direction, dim=1)

    def _layers(self, x, h0, c0, batch_sizes) -> tuple[Tensor, Tensor, Tensor]:
        locked = self.locked_dropout
        x = sequence_dropout(x, self.input_dropout, self.training, locked)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes):
                index = layer * len(self._suffixes) + direction
                out, h, c = self._run_direction(
                    x, f"l{layer}{suffix}", h0[index], c0[:, index], batch_sizes, direction == 1
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if layer < self.num_layers - 1:
                x = sequence_dropout(x, self.dropout, self.training, locked)
        x = sequence_dropout(x, self.output_dropout, self.training, locked)
        return x, torch.stack(h_n), torch.stack(c_n, dim=1)  # (T, B, .), (LD, B, P), (C, LD, B, H)

    def _run_direction(
        self,
        x: Tensor,
        name: str,
        h0: Tensor,
        c0: Tensor,
        batch_sizes: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer/direction ``name`` over x (T, B, I); returns (T, B, P), h_n, c_n.

        Weight drop and the zoneout masks are drawn here, once per call, so that a segment
        recomputed in the backward (``checkpoint_every``) sees the same ones."""
        memory: MemoryFunction = getattr(self, f"memory_{name}")
        outer = self._dropped(self._outer_weights(name), 0)
        levels = None if self.backend == "generic" else memory.fused_levels()
        weights = None
        if levels is not None:
            weights = [outer, *(self._dropped(w, k) for k, (w, _) in enumerate(levels, 1))]
        steps, batch = x.shape[0], x.shape[1]
        zoneout = zoneout_weights(
            self.zoneout_cell,
            self.zoneout_hidden,
            steps,
            batch,
            self.hidden_size,
            self.training,
            x,
        )

        def run(x, h0, c0, batch_sizes, zoneout) -> tuple[Tensor, Tensor, Tensor]:
            return self._run_levels(
                x, name, memory, outer, weights, h0, c0, batch_sizes, reverse, zoneout
            )

        every = self.checkpoint_every
        if every and steps > every and self.training and torch.is_grad_enabled():
            return run_in_segments(run, x, h0, c0, batch_sizes, zoneout, reverse, every)
        return run(x, h0, c0, batch_sizes, zoneout)

    def _regularisers(self) -> dict[str, Any]:
        """The regularisers' settings that differ from their defaults (off)."""
        settings = {
            "weight_drop": self.weight_drop,
            "locked_dropout": self.locked_dropout,
            "input_dropout": self.input_dropout,
            "output_dropout": self.output_dropout,
            "zoneout_cell": self.zoneout_cell,
            "zoneout_hidden": self.zoneout_hidden,
            "checkpoint_every": self.checkpoint_every,
        }
        return {
            name: value
            for name, value in settings.items()
            if value and (not isinstance(value, tuple) or any(value))
        }

    def _dropped(self, weights: LevelWeights, level: int) -> LevelWeights:
        """``weights`` with level ``level``'s weight drop applied to ``weight_hh``."""
        dropped = drop_weight(weights.weight_hh, self.weight_drop[level], self.training)
        return weights._replace(weight_hh=dropped)

    def _run_levels(
        self,
        x: Tensor,
        name: str,
        memory: MemoryFunction,
        outer: LevelWeights,
        weights: list[LevelWeights] | None,
        h0: Tensor,
        c0: Tensor,
        batch_sizes: Tensor | None,
        reverse: bool,
        zoneout: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The recurrence of one layer/direction: the whole-sequence op (``weights``: every
        level's, for additive and nested memory chains) or the generic path."""
        weight_hr = getattr(self, f"weight_hr_{name}", None)
        candidate = memory.outer_candidate_activation
        if weights is not None:
            levels = cast(list, memory.fused_levels())
            activations = (LevelActivations(candidate=candidate), *(a for _, a in levels))
            if weight_hr is not None:  # "naive" too: the projected path is the reference
                return projected_nested_lstm(
                    x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations
                )
            norms = self._norms(name, memory)
            args = (x, weights, h0, c0, batch_sizes, reverse, activations)
            if self.backend == "naive":
                return nested_lstm_naive(*args, zoneout=zoneout, norms=norms)
            return nested_lstm(*args, self.backend, zoneout=zoneout, norms=norms)
        if torch.jit.is_tracing():
            raise RuntimeError(
                f"torch.jit.trace cannot record {type(memory).__name__}'s time loop: the trace "
                "would fix the sequence length and give wrong results for any other; use "
                "torch.export.export or torch.compile, which keep it general"
            )
        if self.backend == "naive":
            return outer_lstm_naive(
                x, outer, memory, h0, c0, batch_sizes, reverse, candidate, weight_hr
            )
        return outer_lstm(x, outer, memory, h0, c0, batch_sizes, reverse, candidate, weight_hr)

    def _norms(self, name: str, memory: MemoryFunction) -> list[LevelNorms | None] | None:
        """Every level's layer normalisation for the op, or None where no level has it."""
        if not any(self.layer_norm):
            return None
        return [layer_norm_parameters(self, f"_{name}"), *cast(list, memory.fused_norms())]

    # ------------------------------------------------------------------ depth 1 with a projection

    def _is_torch_lstm(self) -> bool:
        """A projected depth-1 LSTM with the standard activations runs torch's own LSTM for the
        whole stack, exactly as nn.LSTM does (the op has no projection). Its dropout is
        nn.LSTM's: locked, input and output dropout and segment recomputation need the layers'
        own loop."""
        return (
            self.proj_size > 0
            and not (self.locked_dropout or self.input_dropout or self.output_dropout)
            and self.checkpoint_every is None
            and self.backend not in ("generic", "naive")  # the step-by-step paths, when asked for
            and all(
                m.fused_levels() == [] and m.outer_candidate_activation == "tanh"
                for m in self.memories()
            )
        )

    def _torch_lstm(self, x, h0, c0, batch_sizes) -> tuple[Tensor, Tensor, Tensor]:
        flat: list[Tensor] = []
        for layer in range(self.num_layers):
            for suffix in self._suffixes:
                name = f"l{layer}{suffix}"
                outer = self._dropped(self._outer_weights(name), 0)
                flat += [w for w in outer if w is not None]
                flat.append(getattr(self, f"weight_hr_{name}"))
        hx = (h0, c0[0])
        common = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        if batch_sizes is None:
            out, h_n, c_n = torch._VF.lstm(x, hx, flat, *common, False)
        else:  # x is a packed batch's data, and so is the output
            out, h_n, c_n = torch._VF.lstm(x, batch_sizes, hx, flat, *common)
        return out, h_n, c_n.unsqueeze(0)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        s += f", depth={self.depth}"
        s += "".join(f", {name}={value!r}" for name, value in self._regularisers().items())
        if any(self.layer_norm):
            flags = self.layer_norm
            s += f", layer_norm={True if all(flags) else list(flags)!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _check_lstm_arguments(
    input_size: Any,
    hidden_size: Any,
    num_layers: Any,
    bias: Any,
    batch_first: Any,
    dropout: Any,
    bidirectional: Any,
    proj_size: Any,
) -> None:
    """nn.LSTM's checks, with its exception types and messages."""
    if (
        not isinstance(dropout, numbers.Number)
        or isinstance(dropout, bool)
        or not 0 <= cast(float, dropout) <= 1
    ):
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )
    check_bool(bias, "bias")
    check_bool(batch_first, "batch_first")
    check_bool(bidirectional, "bidirectional")
    check_int(input_size, "input_size")
    check_int(hidden_size, "hidden_size")
    check_int(num_layers, "num_layers")
    check_int(proj_size, "proj_size", minimum=0)
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
    if cast(float, dropout) > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but the last layer, so non-zero dropout "
            f"expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            stacklevel=3,
        )
