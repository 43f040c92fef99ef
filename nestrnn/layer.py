"""NestedLSTM: a drop-in replacement for ``torch.nn.LSTM`` whose cell update is a memory function."""

from __future__ import annotations

import copy
import numbers
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from nestrnn.activations import get_activation
from nestrnn.init import check_init_options, init_lstm_level
from nestrnn.memory.base import MemoryFunction
from nestrnn.memory.build import MemorySpec, build_memory
from nestrnn.ops.nested_lstm import BACKENDS, LevelWeights, nested_lstm
from nestrnn.state import check_input, memory_spec_for_depth, prepare_state
from nestrnn.step import run_generic

LAYER_BACKENDS = ("generic", *BACKENDS)


class NestedLSTM(nn.Module):
    r"""A multi-layer Nested LSTM, with the interface of ``torch.nn.LSTM``.

    Each layer is an LSTM whose cell update ``c_t = f_t * c_{t-1} + i_t * g_t`` is replaced by a
    memory function ``c_t = m(f_t * c_{t-1}, i_t * g_t)``. With ``depth=1`` it is exactly
    ``nn.LSTM`` (same parameter names, loads its state dict); with ``depth=2`` the cell is computed
    by an inner LSTM (the paper's Nested LSTM); ``depth=3`` nests once more, and so on.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as in ``torch.nn.LSTM``.
        depth: memory levels per layer, counting the outer LSTM (default 2 when ``memory`` is not
            given). With ``memory`` given it is optional and, when given, must match it.
        memory: the memory function of every layer and direction: a registered name
            (``"nested"``), a dict ``{"name": "nested", "depth": 3, ...}``, a ``MemoryFunction``
            instance (copied and re-initialised for each further layer/direction) or a callable
            ``factory(hidden_size) -> MemoryFunction``.
        forget_bias: initial forget-gate bias of every level (None: PyTorch's uniform init).
        recurrent_init: ``"orthogonal"`` (default) or ``"uniform"`` recurrent weights.
        backend: ``"auto"`` picks the fastest correct path: the fused op for the standard
            additive/nested chain (its C time loop on CPU, Triton kernels on CUDA when Triton is
            installed), the generic per-step path for any other memory function. ``"generic"``, ``"naive"``, ``"fused"``
            and ``"triton"`` force one (the last three need the standard chain).

    Inputs: ``input, (h_0, c_0)`` (the state may be omitted or None: zeros)
        * input: (L, N, H_in), (N, L, H_in) with ``batch_first=True``, (L, H_in) unbatched, or a
          ``PackedSequence``.
        * h_0: (D_dir * num_layers, N, H) or (D_dir * num_layers, H) unbatched.
        * c_0: (D_dir * num_layers, N, H) when ``depth == 1``, else
          (depth, D_dir * num_layers, N, H); ``c_0[k]`` is memory level k (0 is the outer cell).
          Unbatched: drop the N axis.

    Outputs: ``output, (h_n, c_n)`` with the shapes of the inputs and ``H_out = D_dir * H``.

    Attributes:
        weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k} (and ``_reverse``): the outer
            LSTM's parameters, shaped and named as in ``nn.LSTM``.
        memory_l{k} (and ``memory_l{k}_reverse``): layer k's memory function; a nested level has
            ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` and its own memory ``inner``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        depth: int | None = None,
        memory: MemorySpec | None = None,
        *,
        forget_bias: float | None = 1.0,
        recurrent_init: str = "orthogonal",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int(input_size, "input_size")
        _check_positive_int(hidden_size, "hidden_size")
        _check_positive_int(num_layers, "num_layers")
        for flag, name in (
            (bias, "bias"),
            (batch_first, "batch_first"),
            (bidirectional, "bidirectional"),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but the last layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=2,
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
        self.forget_bias = forget_bias
        self.recurrent_init = recurrent_init
        self.backend = backend

        spec = memory_spec_for_depth(depth) if memory is None else memory
        inherited = {"bias": bias, "forget_bias": forget_bias, "recurrent_init": recurrent_init}
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        self._suffixes = ["", "_reverse"] if bidirectional else [""]
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * len(self._suffixes)
            for suffix in self._suffixes:
                name = f"l{layer}{suffix}"
                w_ih = nn.Parameter(torch.empty(gates, layer_input, **factory_kwargs))
                w_hh = nn.Parameter(torch.empty(gates, hidden_size, **factory_kwargs))
                self.register_parameter(f"weight_ih_{name}", w_ih)
                self.register_parameter(f"weight_hh_{name}", w_hh)
                for kind in ("ih", "hh"):
                    b = nn.Parameter(torch.empty(gates, **factory_kwargs)) if bias else None
                    self.register_parameter(f"bias_{kind}_{name}", b)
                first = layer == 0 and suffix == ""
                if isinstance(spec, MemoryFunction) and not first:
                    layer_memory = copy.deepcopy(spec)
                    layer_memory.reset_parameters()
                else:
                    layer_memory = build_memory(spec, hidden_size, inherited)
                self.add_module(f"memory_{name}", layer_memory.to(**factory_kwargs))

        first_memory = self.memory_l0
        self.num_cells = 1 + first_memory.num_states
        if depth is not None and memory is not None and depth != self.num_cells:
            raise ValueError(
                f"depth={depth} does not match the memory given, which has {self.num_cells} "
                "memory levels; leave depth out or make them agree"
            )
        self.depth = self.num_cells
        self._candidate = get_activation(
            first_memory.outer_candidate_activation, "outer_candidate_activation"
        )
        if backend not in ("auto", "generic") and self._fused_levels(first_memory) is None:
            raise ValueError(
                f"backend={backend!r} runs only the standard additive/nested memory chain with the "
                f"paper's activations; {type(first_memory).__name__} needs backend 'auto' or "
                "'generic'"
            )
        self._init_outer_parameters()

    # ------------------------------------------------------------------ parameters

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
                init_lstm_level(
                    *self._outer_weights(f"l{layer}{suffix}"), self.forget_bias, self.recurrent_init
                )

    def reset_parameters(self) -> None:
        """Re-initialise every parameter, memory functions included."""
        self._init_outer_parameters()
        for module in self.children():
            if isinstance(module, MemoryFunction):
                module.reset_parameters()

    def flatten_parameters(self) -> None:
        """No-op, for code written for ``nn.LSTM`` (there is no cuDNN weight buffer here)."""

    def _fused_levels(self, memory: MemoryFunction) -> list[LevelWeights] | None:
        levels = memory.fused_levels()
        if levels is None:
            return None
        expected = "tanh" if not levels else "identity"  # the op's outer candidate activation
        return levels if memory.outer_candidate_activation == expected else None

    # ------------------------------------------------------------------ forward

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            check_input(data, 2, self.input_size, weight, packed=True)
            x, _ = pad_packed_sequence(PackedSequence(data, batch_sizes))  # (T, B, I), sorted
            batched = True
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            check_input(input, (2, 3), self.input_size, weight)
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
            if self.batch_first:
                x = x.transpose(0, 1)
        h0, c0 = prepare_state(
            hx,
            batched=batched,
            prefix=(self.num_layers * len(self._suffixes),),
            batch=x.shape[1],
            hidden_size=self.hidden_size,
            num_cells=self.num_cells,
            like=weight,
        )
        if sorted_indices is not None:
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(2, sorted_indices)

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
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_out, c_out = torch.stack(h_n), torch.stack(c_n, dim=1)  # (LD, B, H), (cells, LD, B, H)

        if packed:
            lengths = (batch_sizes.unsqueeze(0) > torch.arange(x.shape[1]).unsqueeze(1)).sum(1)
            out_data = pack_padded_sequence(x, lengths).data
            output: Tensor | PackedSequence = PackedSequence(
                out_data, batch_sizes, sorted_indices, unsorted_indices
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

    def _run_direction(
        self,
        x: Tensor,
        name: str,
        h0: Tensor,
        c0: Tensor,
        batch_sizes: Tensor | None,
        reverse: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer/direction ``name`` over x (T, B, I); returns (T, B, H), h_n, c_n."""
        memory: MemoryFunction = getattr(self, f"memory_{name}")
        outer = self._outer_weights(name)
        levels = None if self.backend == "generic" else self._fused_levels(memory)
        if levels is None:
            return run_generic(x, *outer, memory, self._candidate, h0, c0, batch_sizes, reverse)
        backend = self.backend
        if backend == "auto" and memory.preferred_backend is not None and x.is_cuda:
            backend = memory.preferred_backend
        return nested_lstm(x, [outer, *levels], h0, c0, batch_sizes, reverse, backend)

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
        s += f", depth={self.depth}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
