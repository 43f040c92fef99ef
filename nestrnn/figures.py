"""The figures: cell activations per memory level, heat maps, autocorrelation and training curves.

Everything is drawn on ``matplotlib.figure.Figure`` objects and written to PNG files with the Agg
renderer; nothing is ever shown and pyplot's global state is never touched. matplotlib is imported
inside the functions (``import nestrnn`` does not import it); it is the optional ``viz`` extra.

Figure sizes are fixed by the content (units, levels, steps) and not by a tight bounding box, so a
figure's size in pixels is known in advance: each ``*_size`` function returns ``(width, height)``
in pixels, and :func:`save` writes exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestrnn.analysis import EFOLD, Recording, Timescale

DPI = 100
#: shown in place of characters that are hard to see or that no installed font has
VISIBLE = {"\n": "↵", " ": "␣", "\t": "⇥"}
MISSING = "□"
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "Noto Sans CJK JP",
)


def _figure(size: tuple[int, int], dpi: int = DPI) -> Any:
    from matplotlib.figure import Figure

    width, height = size
    # a quarter pixel more than asked: Agg truncates width * dpi to an integer
    return Figure(
        figsize=((width + 0.25) / dpi, (height + 0.25) / dpi), dpi=dpi, layout="constrained"
    )


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (its folder created when missing); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


# --------------------------------------------------------------------------- symbols & fonts


def _font_families() -> list[str]:
    import matplotlib
    from matplotlib import font_manager

    base = list(matplotlib.rcParams["font.family"])
    installed = {f.name for f in font_manager.fontManager.ttflist}
    base += [name for name in CJK_FONTS if name in installed][:1]
    return base


_CHARSET: set[int] | None = None


def _charset() -> set[int]:
    """Code points the figure fonts can draw."""
    global _CHARSET
    if _CHARSET is None:
        from matplotlib import font_manager, ft2font

        points: set[int] = set()
        for family in _font_families():
            try:
                path = font_manager.findfont(
                    font_manager.FontProperties(family=[family]), fallback_to_default=False
                )
                points.update(ft2font.FT2Font(path).get_charmap())
            except Exception:  # a family that cannot be found or read: skip it
                continue
        _CHARSET = points
    return _CHARSET


def displayable(symbols: Sequence[str]) -> list[str]:
    """Symbols as they can be drawn: whitespace made visible, glyphs no font has as a square."""
    charset = _charset()
    shown = []
    for symbol in symbols:
        text = "".join(VISIBLE.get(ch, ch) for ch in str(symbol))
        if len(text) > 1 and text.startswith("<") and text.endswith(">"):
            shown.append(text)  # a named symbol such as <unk>
            continue
        shown.append("".join(ch if ord(ch) in charset else MISSING for ch in text))
    return shown


def _tick_labels(ax: Any, labels: Sequence[str] | None, steps: int, width_px: int) -> None:
    if not labels:
        ax.set_xlabel("step")
        return
    per_label = 9  # pixels one label needs at font size 6
    stride = max(1, math.ceil(steps * per_label / max(width_px, 1)))
    positions = list(range(0, steps, stride))
    ax.set_xticks(positions)
    ax.set_xticklabels([labels[i] for i in positions], fontsize=6, family=_font_families())
    ax.tick_params(axis="x", length=2, pad=1)


# --------------------------------------------------------------------------- cell activations


def cells_size(units: int, levels: int, steps: int) -> tuple[int, int]:
    """Pixel size of :func:`cells_figure`."""
    column = int(min(max(200 + 4 * steps, 400), 1200))
    return 60 + levels * column, 90 + 130 * units


def cells_figure(
    recording: Recording,
    units: Sequence[int],
    labels: Sequence[str] | None = None,
    sample: int = 0,
    title: str = "",
) -> Any:
    """The paper's cell-activation figure: one row per unit, one column per level (outer and
    inner memories of a Nested LSTM, lower and upper layers of a stacked LSTM), the cell value
    over the sequence; ``labels`` (the input symbols) under the last row."""
    units = list(units)
    if not units:
        raise ValueError("no units to plot")
    levels = recording.levels
    steps = recording.steps
    size = cells_size(len(units), len(levels), steps)
    fig = _figure(size)
    axes = fig.subplots(len(units), len(levels), squeeze=False, sharex=True)
    x = np.arange(steps)
    column_px = (size[0] - 60) // len(levels)
    for col, level in enumerate(levels):
        values = recording.cells[col, :, sample]  # (T, H)
        colour = f"C{(level.level if recording.kind == 'nested' else level.layer) % 10}"
        for row, unit in enumerate(units):
            ax = axes[row][col]
            ax.plot(x, values[:, unit], color=colour, linewidth=1.0)
            ax.axhline(0.0, color="0.7", linewidth=0.5, zorder=0)
            ax.margins(x=0.005)
            ax.tick_params(axis="y", labelsize=7)
            if row == 0:
                ax.set_title(level.name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"unit {unit}", fontsize=9)
        _tick_labels(axes[-1][col], labels, steps, column_px)
    fig.suptitle(title or "cell activations per level", fontsize=11)
    return fig


# --------------------------------------------------------------------------- coloured text


def text_size(units: int, levels: int, steps: int, wrap: int = 60) -> tuple[int, int]:
    """Pixel size of :func:`text_figure`."""
    lines = max(1, math.ceil(steps / wrap))
    return 80 + levels * (14 * min(wrap, steps) + 20), 50 + units * (18 * lines + 34)


def text_figure(
    recording: Recording,
    units: Sequence[int],
    labels: Sequence[str],
    sample: int = 0,
    wrap: int = 60,
    title: str = "",
) -> Any:
    """Karpathy-style text figure: each symbol on a background coloured by the cell of one unit
    after reading it (red positive, blue negative, scaled per level by the largest magnitude of
    the plotted units); one row per unit, one column per level."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    units = list(units)
    steps = recording.steps
    if len(labels) != steps:
        raise ValueError(f"{len(labels)} labels for {steps} steps")
    levels = recording.levels
    fig = _figure(text_size(len(units), len(levels), steps, wrap))
    axes = fig.subplots(len(units), len(levels), squeeze=False)
    cmap = colormaps["RdBu_r"]
    width = min(wrap, steps)
    lines = max(1, math.ceil(steps / wrap))
    families = _font_families()
    for col, level in enumerate(levels):
        values = recording.cells[col, :, sample][:, units]
        limit = float(np.abs(values).max()) or 1.0
        values = values / limit  # per level: the strongest value is fully saturated
        for row, unit in enumerate(units):
            ax = axes[row][col]
            ax.set_xlim(0, width)
            ax.set_ylim(lines, 0)
            ax.set_axis_off()
            for t in range(steps):
                y, x = divmod(t, wrap)
                value = float(values[t, row])
                ax.add_patch(Rectangle((x, y), 1, 1, color=cmap(0.5 + 0.5 * value), linewidth=0))
                ax.text(
                    x + 0.5,
                    y + 0.55,
                    labels[t],
                    ha="center",
                    va="center",
                    fontsize=8,
                    family=families,
                    color="white" if abs(value) > 0.65 else "black",
                )
            ax.set_title(f"{level.name}, unit {unit}", fontsize=8, loc="left")
    fig.suptitle(
        (title + ": " if title else "") + "cell after each symbol (red > 0 > blue, scaled "
        "per level)",
        fontsize=10,
    )
    return fig


# --------------------------------------------------------------------------- heat map


def heatmap_size(levels: int, units: int, steps: int) -> tuple[int, int]:
    """Pixel size of :func:`heatmap_figure`."""
    panel = int(min(max(4 * units, 120), 400))
    return int(min(max(300 + 3 * steps, 700), 2000)), 50 + levels * (panel + 40)


def heatmap_figure(
    recording: Recording,
    units: Sequence[int],
    labels: Sequence[str] | None = None,
    sample: int = 0,
    title: str = "",
) -> Any:
    """One heat map per level: ``units`` (rows) over the steps (columns), a colour scale of its
    own per level (symmetric about 0, clipped at the 99th percentile of |c|)."""
    units = list(units)
    levels = recording.levels
    steps = recording.steps
    size = heatmap_size(len(levels), len(units), steps)
    fig = _figure(size)
    axes = fig.subplots(len(levels), 1, squeeze=False, sharex=True)
    for i, level in enumerate(levels):
        ax = axes[i][0]
        values = recording.cells[i, :, sample][:, units].T  # (units, T)
        limit = float(np.percentile(np.abs(values), 99)) if values.size else 1.0
        limit = limit if limit > 0 else 1.0
        image = ax.imshow(
            values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
        )
        ax.set_ylabel(f"{level.name}\nunit", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        if len(units) <= 16:
            ax.set_yticks(range(len(units)))
            ax.set_yticklabels([str(u) for u in units])
        fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03).ax.tick_params(labelsize=7)
    _tick_labels(axes[-1][0], labels, steps, size[0] - 150)
    fig.suptitle(title or f"cells of {len(units)} units per level", fontsize=11)
    return fig


# --------------------------------------------------------------------------- autocorrelation


def acf_size() -> tuple[int, int]:
    """Pixel size of :func:`acf_figure`."""
    return 800, 480


def acf_figure(rows: Sequence[Timescale], title: str = "") -> Any:
    """The mean autocorrelation function of every level, with the 1/e line and each level's
    e-folding lag: the numbers of the timescale table, drawn."""
    fig = _figure(acf_size())
    ax = fig.subplots()
    for i, row in enumerate(rows):
        acf = np.asarray(row.acf)
        label = f"{row.name}: e-fold {row.efold_lag:.1f}, tau_int {row.tau_int:.1f}"
        ax.plot(np.arange(len(acf)), acf, color=f"C{i % 10}", label=label, linewidth=1.4)
        if math.isfinite(row.efold_lag) and not row.efold_censored:
            ax.axvline(row.efold_lag, color=f"C{i % 10}", linestyle=":", linewidth=0.8)
    ax.axhline(EFOLD, color="0.4", linestyle="--", linewidth=0.8, label="1/e")
    ax.axhline(0.0, color="0.7", linewidth=0.5)
    ax.set_xlabel("lag (steps)")
    ax.set_ylabel("mean autocorrelation of the cells")
    ax.legend(fontsize=8)
    ax.set_title(title or "how long each level remembers", fontsize=11)
    return fig


# --------------------------------------------------------------------------- training curves


def curves_size(metrics: int) -> tuple[int, int]:
    """Pixel size of :func:`curves_figure`."""
    return 900, 60 + 320 * metrics


def _ema(values: Sequence[float], smooth: float) -> list[float]:
    if not smooth:
        return list(values)
    out: list[float] = []
    average = None
    for value in values:
        average = value if average is None else smooth * average + (1 - smooth) * value
        out.append(average)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_series(
    records: Sequence[dict[str, Any]], metric: str
) -> dict[str, list[tuple[int, float]]]:
    """``metric`` over the optimizer steps in a run's metrics.jsonl records: ``train`` (the
    periodic training records), ``valid`` (after each epoch) and ``test`` (at the end)."""
    series: dict[str, list[tuple[int, float]]] = {"train": [], "valid": [], "test": []}
    for record in records:
        event = record.get("event")
        step = int(record.get("step", 0))
        if event == "train":
            value = _number(record.get(metric))
            if value is not None:
                series["train"].append((step, value))
        elif event == "epoch":
            value = _number((record.get("valid") or {}).get(metric))
            if value is not None:
                series["valid"].append((step, value))
        elif event == "test":
            value = _number(record.get(metric))
            if value is not None:
                series["test"].append((step, value))
    return series


def curves_figure(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    metrics: Sequence[str],
    smooth: float = 0.0,
    log_y: bool = False,
    title: str = "",
) -> Any:
    """Training curves of several runs overlaid, one panel per metric: the training records as a
    thin line (exponentially smoothed with ``smooth``), validation after each epoch as a thick
    line with dots, the test result as a star; one colour per run."""
    fig = _figure(curves_size(len(metrics)))
    axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)
    for m, metric in enumerate(metrics):
        ax = axes[m][0]
        drawn = False
        for i, (label, records) in enumerate(runs):
            colour = f"C{i % 10}"
            series = run_series(records, metric)
            if series["train"]:
                steps, values = zip(*series["train"])
                ax.plot(
                    steps,
                    _ema(values, smooth),
                    color=colour,
                    linewidth=0.8,
                    alpha=0.6,
                    label=f"{label} train",
                )
                drawn = True
            if series["valid"]:
                steps, values = zip(*series["valid"])
                ax.plot(
                    steps,
                    values,
                    color=colour,
                    linewidth=1.8,
                    marker="o",
                    markersize=3,
                    label=f"{label} valid",
                )
                drawn = True
            if series["test"]:
                steps, values = zip(*series["test"])
                ax.plot(
                    steps,
                    values,
                    color=colour,
                    marker="*",
                    markersize=11,
                    linestyle="none",
                    label=f"{label} test",
                )
                drawn = True
        if not drawn:
            ax.text(
                0.5,
                0.5,
                f"no values of {metric!r}",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        else:
            ax.legend(fontsize=7, ncols=max(1, min(3, len(runs))))
        if log_y and drawn:
            ax.set_yscale("log")
        ax.set_ylabel(metric)
        ax.grid(True, linewidth=0.3, alpha=0.5)
    axes[-1][0].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
