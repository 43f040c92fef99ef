"""Recording every memory level's cell at every step, and measuring how fast each level changes.

The Nested LSTM paper's claim is qualitative: the inner memory changes more slowly than the outer
one ("a temporal hierarchy"). This module turns it into numbers.

Recording (:func:`record_cells`). A model is run one step at a time (chunks of length 1, feeding
the returned state back, which is exact for every family), and after each step the whole state is
kept. What counts as a *level*:

* ``nlstm`` (``NestedLSTM``, ``c_n`` of shape ``(depth, layers, B, H)``): for every layer, the
  outer cell ``c^0`` and each inner memory ``c^1 .. c^{D-1}``;
* ``lstm`` / ``stacked_lstm`` (``nn.LSTM`` or ``NestedLSTM(depth=1)``, ``c_n`` of shape
  ``(layers, B, H)``): each layer's cell, layer 0 the lowest.

Statistics (:func:`timescales`, numpy only), computed over time for each level and averaged over
units and sequences (every non-time axis is an independent series):

* ``mean_abs_change``: mean of ``|c_t - c_{t-1}|``;
* ``std``: mean over series of the standard deviation over time;
* ``relative_change``: mean over series of ``mean |c_t - c_{t-1}| / std`` (scale-free: a level that
  is only small is not counted as stable);
* ``efold_lag``: the lag (interpolated between integer lags) where the mean autocorrelation
  function (ACF) first drops below ``1/e``; for an AR(1) process ``x_t = a x_{t-1} + e_t`` it is
  ``-1 / ln a``. ``efold_censored`` is true when the ACF never got there within ``max_lag`` (the
  value is then a lower bound);
* ``tau_int``: the integrated autocorrelation time ``1 + 2 sum_{k>=1} rho(k)`` of the mean ACF,
  summed over Sokal's self-consistent window (the smallest ``W >= c * tau_int(W)``, ``c = 5``); for
  an AR(1) process it is ``(1 + a) / (1 - a)``, for white noise 1;
* ``median_unit_efold``: the median over series of each series' own e-folding lag;
* ``efold_lag_detrended`` / ``tau_int_detrended``: the same two numbers after removing each
  series' least-squares straight line over the window. A cell that drifts steadily (an
  integrator or counter: trained inner memories do this) has a long raw autocorrelation because
  of the drift alone; what survives detrending is memory beyond the drift.

Series that are constant over the window (standard deviation below ``1e-8``) are left out of the
ACF statistics and counted in ``constant_series``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EFOLD = 1.0 / math.e
SOKAL_C = 5.0
CONSTANT_EPS = 1e-8


# --------------------------------------------------------------------------- recording


@dataclass
class Level:
    """One recorded memory level: which layer and which level of that layer, and its name."""

    name: str  # e.g. "outer c0", "inner c1", "layer 0 (lower)"
    layer: int  # the recurrent layer (for lstm families: the LSTM layer)
    level: int  # the memory level inside the layer (0: the outer cell; always 0 for LSTMs)


@dataclass
class Recording:
    """Cells of every level at every step.

    ``cells`` has shape ``(levels, T, B, H)``: ``cells[i, t]`` is level ``levels[i]`` after step
    ``t``; ``hidden`` has shape ``(layers, T, B, H)``.
    """

    cells: np.ndarray
    hidden: np.ndarray
    levels: list[Level]
    kind: str  # "nested": levels are memory levels; "stacked": levels are LSTM layers

    @property
    def steps(self) -> int:
        return self.cells.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.cells.shape[-1]

    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    def sliced(self, start: int = 0, stop: int | None = None) -> Recording:
        """The recording restricted to steps ``start:stop``."""
        return Recording(
            self.cells[:, start:stop], self.hidden[:, start:stop], self.levels, self.kind
        )


def recurrent_core(model: Any) -> Any:
    """The recurrent module of a task model (its ``rnn`` attribute), or the model itself."""
    return getattr(model, "rnn", model)


def _level_names(kind: str, layers: int, depth: int) -> list[Level]:
    levels: list[Level] = []
    if kind == "stacked":
        for layer in range(layers):
            if layers == 1:
                name = "cell"
            elif layer == 0:
                name = "layer 0 (lower)"
            elif layer == layers - 1:
                name = f"layer {layer} (upper)"
            else:
                name = f"layer {layer}"
            levels.append(Level(name, layer, 0))
        return levels
    for layer in range(layers):
        prefix = f"L{layer} " if layers > 1 else ""
        for level in range(depth):
            if level == 0:
                name = "outer c0"
            elif depth == 2:
                name = "inner c1"
            else:
                name = f"inner c{level}"
            levels.append(Level(prefix + name, layer, level))
    return levels


def split_state(state: Any) -> tuple[Any, Any, str]:
    """``(h, cells, kind)`` of a returned state; ``cells`` is ``(levels, B, H)`` per layer order.

    For a nested state (``c`` of shape ``(depth, layers, B, H)``) the levels are ordered layer by
    layer (``L0 c0, L0 c1, ..., L1 c0, ...``); for an LSTM state (``c`` of ``(layers, B, H)``) they
    are the layers.
    """
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(
            f"expected a state (h, c) as returned by an LSTM or NestedLSTM, got {type(state).__name__}"
        )
    h, c = state
    if c.dim() == 4:
        depth, layers = c.shape[0], c.shape[1]
        cells = c.transpose(0, 1).reshape(depth * layers, *c.shape[2:])
        return h, cells, "nested"
    if c.dim() == 3:
        return h, c, "stacked"
    raise ValueError(f"unexpected cell state of shape {tuple(c.shape)}")


def record_cells(model: Any, inputs: Any, state: Any = None, batch_first: bool = True) -> Recording:
    """Run ``model`` over ``inputs`` one step at a time and keep every level's cell at every step.

    ``model(x, state) -> (output, state)`` is a task model (``TokenModel``, ``SequenceModel``) or a
    recurrent core (``NestedLSTM``, ``nn.LSTM``); ``inputs`` is batch-first ``(B, T, ...)`` (or
    ``(T, B, ...)`` with ``batch_first=False``). ``state`` is the state to start from (None: zeros),
    e.g. one returned by a warm-up. Runs under ``torch.no_grad()`` in the model's current mode
    (call ``model.eval()`` first to switch dropout off).
    """
    import torch

    core = recurrent_core(model)
    if getattr(core, "bidirectional", False):
        raise ValueError(
            "a bidirectional model cannot be stepped one step at a time; record_cells needs a "
            "unidirectional one"
        )
    time_axis = 1 if batch_first else 0
    steps = inputs.shape[time_axis]
    if steps == 0:
        raise ValueError("inputs have no time steps")
    cells: list[np.ndarray] = []
    hidden: list[np.ndarray] = []
    kind = "stacked"
    with torch.no_grad():
        for t in range(steps):
            x = inputs.narrow(time_axis, t, 1)
            _, state = model(x, state)
            h, c, kind = split_state(state)
            cells.append(c.detach().float().cpu().numpy())
            hidden.append(h.detach().float().cpu().numpy())
    cell_array = np.stack(cells, axis=1)  # (levels, T, B, H)
    hidden_array = np.stack(hidden, axis=1)  # (layers, T, B, H)
    layers = hidden_array.shape[0]
    depth = cell_array.shape[0] // layers if kind == "nested" else 1
    return Recording(cell_array, hidden_array, _level_names(kind, layers, depth), kind)


def warm_state(model: Any, inputs: Any, state: Any = None) -> Any:
    """The state after reading ``inputs`` (batch-first) in one call; None for empty inputs."""
    import torch

    if inputs is None or inputs.shape[1] == 0:
        return state
    with torch.no_grad():
        _, state = model(inputs, state)
    return state


# --------------------------------------------------------------------------- statistics


def _series(x: np.ndarray) -> np.ndarray:
    """``x`` with time first, as ``(T, N)`` float64 (every other axis an independent series)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("expected an array with a time axis")
    return x.reshape(x.shape[0], -1)


def autocorrelation(x: np.ndarray, max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalised autocorrelation of every series of ``x`` (time on axis 0).

    Returns ``(acf, keep)``: ``acf`` of shape ``(max_lag + 1, N_kept)`` with ``acf[0] == 1``, the
    standard biased estimator ``sum_t x_t x_{t+k} / sum_t x_t^2`` of the mean-removed series; and
    ``keep``, the mask of the series that are not constant (the only ones in ``acf``).
    """
    series = _series(x)
    steps = series.shape[0]
    if steps < 2:
        raise ValueError(f"need at least 2 time steps for an autocorrelation, got {steps}")
    max_lag = steps - 1 if max_lag is None else min(int(max_lag), steps - 1)
    centred = series - series.mean(axis=0, keepdims=True)
    keep = centred.std(axis=0) > CONSTANT_EPS
    centred = centred[:, keep]
    if centred.shape[1] == 0:
        return np.ones((max_lag + 1, 0)), keep
    size = 1 << math.ceil(math.log2(2 * steps))
    spectrum = np.fft.rfft(centred, n=size, axis=0)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=0)[: max_lag + 1]
    return acov / acov[:1], keep


def efold_lag(acf: np.ndarray, threshold: float = EFOLD) -> tuple[float, bool]:
    """The first lag where ``acf`` (1-D, ``acf[0] == 1``) drops below ``threshold``, linearly
    interpolated between the integer lags around the crossing; ``(lag, censored)``, where
    ``censored`` means it never dropped (the last lag is returned as a lower bound)."""
    acf = np.asarray(acf, dtype=np.float64)
    below = np.nonzero(acf < threshold)[0]
    if below.size == 0:
        return float(len(acf) - 1), True
    k = int(below[0])
    if k == 0:  # pragma: no cover - acf[0] is 1
        return 0.0, False
    upper, lower = acf[k - 1], acf[k]
    return float(k - 1 + (upper - threshold) / (upper - lower)), False


def integrated_time(acf: np.ndarray, c: float = SOKAL_C) -> tuple[float, int]:
    """Integrated autocorrelation time ``1 + 2 sum_{k=1}^{W} acf[k]`` with Sokal's window.

    ``W`` is the smallest lag with ``W >= c * tau(W)`` (or the last lag when none is); returns
    ``(tau, W)``. Never below 0.5 (a strongly anti-correlated series would give less).
    """
    acf = np.asarray(acf, dtype=np.float64)
    taus = 1.0 + 2.0 * np.cumsum(acf[1:])
    if taus.size == 0:
        return 1.0, 0
    windows = np.arange(1, len(acf))
    good = np.nonzero(windows >= c * taus)[0]
    index = int(good[0]) if good.size else len(taus) - 1
    return float(max(taus[index], 0.5)), int(windows[index])


@dataclass
class Timescale:
    """How fast one level changes (see the module docstring for each number)."""

    name: str
    mean_abs_change: float
    std: float
    relative_change: float
    efold_lag: float
    efold_censored: bool
    tau_int: float
    tau_window: int
    median_unit_efold: float
    efold_lag_detrended: float
    efold_detrended_censored: bool
    tau_int_detrended: float
    series: int
    constant_series: int
    steps: int
    acf: list[float] = field(default_factory=list)  # the mean ACF at lags 0..max_lag

    def as_dict(self, with_acf: bool = True) -> dict[str, Any]:
        data = dict(self.__dict__)
        if not with_acf:
            data.pop("acf")
        return data


def detrend(x: np.ndarray) -> np.ndarray:
    """Each series of ``x`` (time on axis 0) minus its least-squares straight line."""
    series = _series(x)
    t = np.arange(series.shape[0], dtype=np.float64)
    t -= t.mean()
    centred = series - series.mean(axis=0, keepdims=True)
    slope = (t @ centred) / (t @ t)
    return centred - np.outer(t, slope)


def _acf_summary(acf: np.ndarray) -> tuple[np.ndarray, float, bool, float, int]:
    """Mean ACF over series and its e-folding lag (with censoring) and integrated time."""
    mean_acf = acf.mean(axis=1)
    lag, censored = efold_lag(mean_acf)
    tau, window = integrated_time(mean_acf)
    return mean_acf, lag, censored, tau, window


def timescale(x: np.ndarray, name: str = "", max_lag: int | None = None) -> Timescale:
    """The statistics of one level, ``x`` of shape ``(T, ...)`` (time first).

    ``max_lag`` defaults to ``T // 4`` (at least 1), the usual reach of a trustworthy ACF estimate.
    """
    series = _series(x)
    steps = series.shape[0]
    if steps < 3:
        raise ValueError(f"need at least 3 time steps to measure a timescale, got {steps}")
    max_lag = max(steps // 4, 1) if max_lag is None else max(1, min(int(max_lag), steps - 1))
    change = np.abs(np.diff(series, axis=0))
    std = series.std(axis=0)
    acf, keep = autocorrelation(series, max_lag)
    kept = int(keep.sum())
    if kept:
        relative = float(np.mean(change[:, keep].mean(axis=0) / std[keep]))
        mean_acf, lag, censored, tau, window = _acf_summary(acf)
        unit_lags = [efold_lag(acf[:, j])[0] for j in range(kept)]
        median_unit = float(np.median(unit_lags))
        flat_acf, _ = autocorrelation(detrend(series[:, keep]), max_lag)
        if flat_acf.shape[1]:
            _, flat_lag, flat_censored, flat_tau, _ = _acf_summary(flat_acf)
        else:  # every series was a straight line
            flat_lag, flat_censored, flat_tau = 0.0, False, 0.0
    else:  # nothing moves: no timescale
        relative, mean_acf = 0.0, np.ones(max_lag + 1)
        lag, censored, tau, window, median_unit = math.inf, True, math.inf, 0, math.inf
        flat_lag, flat_censored, flat_tau = math.inf, True, math.inf
    return Timescale(
        name=name,
        mean_abs_change=float(change.mean()),
        std=float(std.mean()),
        relative_change=relative,
        efold_lag=lag,
        efold_censored=censored,
        tau_int=tau,
        tau_window=window,
        median_unit_efold=median_unit,
        efold_lag_detrended=flat_lag,
        efold_detrended_censored=flat_censored,
        tau_int_detrended=flat_tau,
        series=series.shape[1],
        constant_series=series.shape[1] - kept,
        steps=steps,
        acf=[float(v) for v in mean_acf],
    )


def timescales(
    recording: Recording, burn_in: int = 0, max_lag: int | None = None
) -> list[Timescale]:
    """One :class:`Timescale` per level of ``recording``, skipping the first ``burn_in`` steps."""
    if burn_in < 0 or burn_in >= recording.steps - 2:
        raise ValueError(
            f"burn_in={burn_in} leaves fewer than 3 of the {recording.steps} recorded steps"
        )
    return [
        timescale(recording.cells[i, burn_in:], level.name, max_lag)
        for i, level in enumerate(recording.levels)
    ]


def _fmt_value(value: float, censored: bool = False, digits: int = 2) -> str:
    if not math.isfinite(value):
        return "inf"
    return (">" if censored else "") + f"{value:.{digits}f}"


def format_table(rows: list[Timescale]) -> str:
    """A plain-text table of the timescales, one row per level."""
    header = [
        "level",
        "|dc| mean",
        "std",
        "|dc|/std",
        "e-fold lag",
        "tau_int",
        "unit e-fold",
        "detrended e-fold",
        "tau_int",
    ]
    body = [
        [
            row.name,
            f"{row.mean_abs_change:.4f}",
            f"{row.std:.4f}",
            f"{row.relative_change:.4f}",
            _fmt_value(row.efold_lag, row.efold_censored),
            _fmt_value(row.tau_int),
            _fmt_value(row.median_unit_efold),
            _fmt_value(row.efold_lag_detrended, row.efold_detrended_censored),
            _fmt_value(row.tau_int_detrended),
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for r in [header, *body]:
        cells = [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pick_units(recording: Recording, count: int, burn_in: int = 0) -> list[int]:
    """The ``count`` most variable units: ranked by their standard deviation over time, each
    level's divided by that level's largest, summed over levels (a unit active on any level)."""
    cells = recording.cells[:, burn_in:] if recording.steps - burn_in >= 2 else recording.cells
    std = cells.std(axis=1).mean(axis=1)  # (levels, H): over time, averaged over batch rows
    scale = std.max(axis=1, keepdims=True)
    score = (std / np.where(scale > 0, scale, 1.0)).sum(axis=0)
    order = np.argsort(-score, kind="stable")
    return sorted(int(u) for u in order[: max(0, min(count, recording.hidden_size))])
