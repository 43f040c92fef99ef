"""The learning curves of ``nestrnn compare --plot``: the validation metric over the optimizer
steps, one colour per configuration, the mean over its seeds as a line and ± one sd as a band
(at the steps every seed of the configuration recorded).

Drawn like :mod:`nestrnn.figures`: on a ``Figure`` object, never through pyplot's global state.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the formats --plot writes, by file suffix
FORMATS = ("png", "svg", "pdf")


def mean_curve(
    curves: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float | None]]:
    """The steps every curve has, the mean there and the sd (None with one curve)."""
    if not curves:
        return [], [], []
    shared = sorted(set.intersection(*(set(dict(c)) for c in curves)))
    means, sds = [], []
    for step in shared:
        values = [dict(c)[step] for c in curves]
        means.append(statistics.fmean(values))
        sds.append(statistics.stdev(values) if len(values) > 1 else None)
    return shared, means, sds


def curves_figure(
    configurations: Sequence[tuple[str, Sequence[Sequence[dict[str, Any]]]]], metric: str
) -> Any:
    """``configurations``: (label, the metrics.jsonl records of each of its runs)."""
    from matplotlib.figure import Figure

    from nestrnn import figures

    width, height = figures.curves_size(1)
    fig = Figure(
        figsize=(width / figures.DPI, height / figures.DPI), dpi=figures.DPI, layout="constrained"
    )
    ax = fig.subplots()
    drawn = False
    for i, (label, runs) in enumerate(configurations):
        curves = [figures.run_series(records, metric)["valid"] for records in runs]
        steps, means, sds = mean_curve([c for c in curves if c])
        if not steps:
            continue
        colour = f"C{i % 10}"
        ax.plot(
            steps,
            means,
            color=colour,
            linewidth=1.8,
            marker="o",
            markersize=3,
            label=f"{label} (n={len(runs)})",
        )
        if all(sd is not None for sd in sds):
            low = [m - s for m, s in zip(means, sds)]  # type: ignore[operator]
            high = [m + s for m, s in zip(means, sds)]  # type: ignore[operator]
            ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(
            0.5,
            0.5,
            f"no validation values of {metric!r}",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"valid {metric} (mean ± sd over seeds)")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    return fig


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` in the format its suffix names (png, svg, pdf)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format=path.suffix[1:].lower(), dpi=fig.dpi)
    return path
