"""Model families, task heads and sizing to a parameter budget.

Families (``model.family``), all batch-first and all returning ``output, state``:

* ``nlstm``: :class:`~nestrnn.NestedLSTM` with ``num_layers`` layers of ``depth`` memory levels
  (or any memory function by name/options through ``model.memory``);
* ``lstm``: an LSTM with ``num_layers`` layers;
* ``stacked_lstm``: an LSTM with ``num_layers * depth`` layers, the stacked counterpart of a
  depth-``depth`` Nested LSTM (same parameter count at the same hidden size).

LSTM families use ``nn.LSTM`` (cuDNN on GPU) by default, initialised like the Nested LSTM
(orthogonal recurrent weights, forget bias 1), or ``NestedLSTM(depth=1)`` with
``model.lstm_impl=nestrnn`` or with any recurrent regulariser (weight drop, zoneout, locked
dropout between layers, segment recomputation, layer normalisation: ``nn.LSTM`` has none of
them). An LSTM family takes level 0's value of a per-level ``model.weight_drop``/
``model.zoneout_cell``/``model.layer_norm``: each of its layers is one level.

Heads: :class:`TokenModel` (embedding, recurrent core, a linear read-out at every step: language
models, copy memory) and :class:`SequenceModel` (feature vectors in, one read-out from the last
step or every step: MNIST glimpses, the adding problem).

Fair comparisons: :func:`solve_hidden_size` finds the hidden size that brings a whole model (head
included) closest to ``model.target_params``; models are built on the ``meta`` device for this, so
sizing is instant and consumes no random numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from nestrnn.config import FAMILIES, ModelConfig
from nestrnn.init import init_lstm_level
from nestrnn.layer import NestedLSTM
from nestrnn.regularisers import sequence_dropout

State = Any  # (h, c) as returned by the recurrent core; None for zeros


def _memory_spec(memory: Any) -> Any:
    if isinstance(memory, DictConfig):
        return OmegaConf.to_container(memory, resolve=True)
    return dict(memory) if isinstance(memory, dict) else memory


def _plain(value: Any) -> Any:
    """A config value as plain Python (a ListConfig of rates becomes a list)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _level_zero(value: Any) -> Any:
    """Level 0's rate of a per-level setting (a number applies to every level)."""
    value = _plain(value)
    return value[0] if isinstance(value, list) else value


def recurrent_regularisers(cfg: ModelConfig, levels_of_one_layer: bool) -> dict[str, Any]:
    """The ``NestedLSTM`` keyword arguments of ``cfg``'s recurrent regularisers (per level, or
    level 0's rates for a layer of one level)."""
    rates = _level_zero if levels_of_one_layer else _plain
    return {
        "weight_drop": rates(cfg.weight_drop),
        "locked_dropout": cfg.locked_dropout,
        "zoneout_cell": rates(cfg.zoneout_cell),
        "zoneout_hidden": cfg.zoneout_hidden,
        "checkpoint_every": cfg.checkpoint_every or None,
    }


def _needs_nestrnn_lstm(cfg: ModelConfig, layers: int) -> bool:
    """Whether an LSTM family needs ``NestedLSTM(depth=1)``: a regulariser nn.LSTM lacks."""
    return bool(
        _level_zero(cfg.weight_drop)
        or _level_zero(cfg.zoneout_cell)
        or cfg.zoneout_hidden
        or cfg.checkpoint_every
        or _level_zero(cfg.layer_norm)
        or (cfg.locked_dropout and layers > 1 and cfg.dropout)
    )


def build_recurrent(cfg: ModelConfig, input_size: int, hidden_size: int) -> nn.Module:
    """The recurrent core of family ``cfg.family`` (batch_first=True)."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {cfg.family!r}")
    dropout = cfg.dropout
    if cfg.family == "nlstm":
        memory = _memory_spec(cfg.memory)
        return NestedLSTM(
            input_size,
            hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=dropout if cfg.num_layers > 1 else 0.0,
            depth=None if memory is not None else cfg.depth,
            memory=memory,
            forget_bias=cfg.forget_bias,
            recurrent_init=cfg.recurrent_init,
            backend=cfg.backend,
            layer_norm=_plain(cfg.layer_norm),
            **recurrent_regularisers(cfg, levels_of_one_layer=False),
        )
    layers = cfg.num_layers * (cfg.depth if cfg.family == "stacked_lstm" else 1)
    layer_dropout = dropout if layers > 1 else 0.0
    if cfg.lstm_impl == "nestrnn" or _needs_nestrnn_lstm(cfg, layers):
        return NestedLSTM(
            input_size,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            dropout=layer_dropout,
            depth=1,
            forget_bias=cfg.forget_bias,
            recurrent_init=cfg.recurrent_init,
            backend=cfg.backend,
            layer_norm=bool(_level_zero(cfg.layer_norm)),
            **recurrent_regularisers(cfg, levels_of_one_layer=True),
        )
    lstm = nn.LSTM(
        input_size, hidden_size, num_layers=layers, batch_first=True, dropout=layer_dropout
    )
    if lstm.weight_hh_l0.device.type != "meta":
        for layer in range(layers):
            init_lstm_level(
                getattr(lstm, f"weight_ih_l{layer}"),
                getattr(lstm, f"weight_hh_l{layer}"),
                getattr(lstm, f"bias_ih_l{layer}"),
                getattr(lstm, f"bias_hh_l{layer}"),
                cfg.forget_bias,
                cfg.recurrent_init,
            )
    return lstm


def describe_family(cfg: ModelConfig) -> str:
    if cfg.family == "nlstm":
        memory = _memory_spec(cfg.memory)
        inner = f"memory {memory}" if memory is not None else f"depth {cfg.depth}"
        return f"nlstm ({inner}, {cfg.num_layers} layer{'s' * (cfg.num_layers > 1)})"
    layers = cfg.num_layers * (cfg.depth if cfg.family == "stacked_lstm" else 1)
    return f"{cfg.family} ({layers} layer{'s' * (layers > 1)})"


class HeadDropout(nn.Module):
    """Dropout of a head's (B, T, F) sequences: the recurrent core's input and its output, each
    at its own rate (``model.input_dropout``/``output_dropout``, default ``model.dropout``), one
    mask per sequence with ``model.locked_dropout``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_rate = cfg.dropout if cfg.input_dropout is None else cfg.input_dropout
        self.output_rate = cfg.dropout if cfg.output_dropout is None else cfg.output_dropout
        self.locked = cfg.locked_dropout

    def input(self, x: Tensor) -> Tensor:
        return sequence_dropout(x, self.input_rate, self.training, self.locked, time_dim=1)

    def output(self, x: Tensor) -> Tensor:
        time_dim = 1 if x.dim() == 3 else 0  # (B, F) outputs of one step: one mask anyway
        return sequence_dropout(x, self.output_rate, self.training, self.locked, time_dim)


class TokenModel(nn.Module):
    """Tokens in, a distribution over output tokens at every step.

    ``forward(tokens (B, T) long, state) -> (logits (B, T, n_out), state)``.
    """

    def __init__(self, cfg: ModelConfig, vocab_in: int, n_out: int, hidden_size: int) -> None:
        super().__init__()
        embedding_dim = cfg.embedding_dim or hidden_size
        self.embedding = nn.Embedding(vocab_in, embedding_dim)
        self.rnn = build_recurrent(cfg, embedding_dim, hidden_size)
        self.dropout = HeadDropout(cfg)
        self.decoder = nn.Linear(hidden_size, n_out)

    def forward(self, tokens: Tensor, state: State = None) -> tuple[Tensor, State]:
        x = self.dropout.input(self.embedding(tokens))
        out, state = self.rnn(x, state)
        return self.decoder(self.dropout.output(out)), state


class SequenceModel(nn.Module):
    """Feature vectors in; a read-out from the last step (``readout="last"``) or every step.

    ``forward(x (B, T, F), state) -> (out (B, n_out) or (B, T, n_out), state)``.
    """

    def __init__(
        self, cfg: ModelConfig, input_size: int, n_out: int, hidden_size: int, readout: str = "last"
    ) -> None:
        super().__init__()
        if readout not in ("last", "all"):
            raise ValueError(f"readout must be 'last' or 'all', got {readout!r}")
        self.readout = readout
        self.rnn = build_recurrent(cfg, input_size, hidden_size)
        self.dropout = HeadDropout(cfg)
        self.decoder = nn.Linear(hidden_size, n_out)

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        out, state = self.rnn(x, state)
        if self.readout == "last":
            out = out[:, -1]
        return self.decoder(self.dropout.output(out)), state


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Sizing:
    """The outcome of sizing a model: the hidden size used and the parameter count."""

    family: str
    hidden_size: int
    params: int
    target: int = 0

    def describe(self) -> str:
        text = f"hidden {self.hidden_size}: {self.params:,} parameters"
        if self.target:
            off = 100.0 * (self.params - self.target) / self.target
            text += f" (target {self.target:,}, {off:+.1f}%)"
        return text


#: how far from model.target_params a solved model may be (a fraction of the target)
TOLERANCE = 0.1


def meta_count(build: Callable[[int], nn.Module], hidden_size: int) -> int:
    """Parameters of ``build(hidden_size)``, built on the meta device (no memory, no RNG)."""
    with torch.device("meta"):
        return count_parameters(build(hidden_size))


def solve_hidden_size(
    build: Callable[[int], nn.Module], target: int, max_hidden: int = 1 << 16
) -> tuple[int, int]:
    """The hidden size whose model ``build(h)`` has the parameter count closest to ``target``.

    Parameter counts grow with h, so this bisects; returns ``(hidden_size, params)``.
    """
    if target <= 0:
        raise ValueError(f"target_params must be positive, got {target}")
    low, high = 1, 2
    while meta_count(build, high) < target and high < max_hidden:
        low, high = high, min(2 * high, max_hidden)
    while high - low > 1:
        mid = (low + high) // 2
        if meta_count(build, mid) < target:
            low = mid
        else:
            high = mid
    counts = {h: meta_count(build, h) for h in (low, high)}
    best = min(counts, key=lambda h: (abs(counts[h] - target), h))
    return best, counts[best]


def size_model(cfg: ModelConfig, build: Callable[[ModelConfig, int], nn.Module]) -> Sizing:
    """The hidden size for ``cfg``: ``cfg.hidden_size``, or solved for ``cfg.target_params``."""
    if cfg.target_params > 0:
        target = cfg.target_params
        hidden, params = solve_hidden_size(lambda h: build(cfg, h), target)
        if abs(params - target) > TOLERANCE * target:
            smallest = meta_count(lambda h: build(cfg, h), 1)
            hint = (
                f"the smallest {cfg.family} model (hidden size 1) has {smallest:,}; raise "
                "model.target_params or shrink model.embedding_dim"
                if smallest > target
                else "set model.hidden_size instead"
            )
            raise ValueError(
                f"no hidden size brings the {cfg.family} model near model.target_params="
                f"{target:,} (closest: {params:,} at hidden size {hidden}); {hint}"
            )
        return Sizing(cfg.family, hidden, params, target)
    return Sizing(cfg.family, cfg.hidden_size, meta_count(lambda h: build(cfg, h), cfg.hidden_size))


def family_table(cfg: ModelConfig, build: Callable[[ModelConfig, int], nn.Module]) -> list[Sizing]:
    """Sizing of every family at ``cfg``'s target (or hidden size): the fair-comparison table."""
    return [size_model(replace(cfg, family=family), build) for family in FAMILIES]


def format_family_table(rows: list[Sizing], chosen: str | None = None) -> str:
    lines = [f"{'family':<14}{'hidden':>8}{'parameters':>14}{'vs target':>11}"]
    for row in rows:
        off = f"{100.0 * (row.params - row.target) / row.target:+.1f}%" if row.target else "-"
        mark = "  <- this run" if row.family == chosen else ""
        lines.append(f"{row.family:<14}{row.hidden_size:>8}{row.params:>14,}{off:>11}{mark}")
    return "\n".join(lines)
