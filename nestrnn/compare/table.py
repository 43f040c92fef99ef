"""The comparison of configurations: one row per configuration (the ``--json`` objects), laid out
as an aligned text table or a Markdown table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from nestrnn.compare import stats
from nestrnn.compare.runs import Configuration, Run

SPLITS = ("test", "valid")


def value_of(run: Run, split: str, metric: str) -> float | None:
    """The run's ``metric`` on ``split`` from summary.json (valid: the best epoch's)."""
    assert run.summary is not None
    value = (run.summary.get(split) or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rows(
    configurations: Sequence[Configuration], metric: str, split: str, baseline: int
) -> list[dict[str, Any]]:
    """Per configuration: the statistics of ``metric`` over its runs and the test against the
    configuration at index ``baseline`` (every run must have the value: see the command)."""
    values = [[(run.seed, value_of(run, split, metric)) for run in c.runs] for c in configurations]
    base = values[baseline]
    out = []
    for index, (c, pairs) in enumerate(zip(configurations, values)):
        summary = stats.describe([v for _, v in pairs])  # type: ignore[misc]
        test = None if index == baseline else stats.compare_seeds(pairs, base)  # type: ignore[arg-type]
        summaries = [run.summary for run in c.runs if run.summary]
        walls = [float(w) for s in summaries if isinstance(w := s.get("elapsed_s"), (int, float))]
        steps = [s["steps"] for s in summaries if isinstance(s.get("steps"), int)]
        out.append(
            {
                "label": c.label,
                "config": c.differing,
                "runs": [str(run.path) for run in c.runs],
                "seeds": [run.seed for run in c.runs],
                "n": summary.n,
                "metric": metric,
                "split": split,
                "mean": summary.mean,
                "sd": summary.sd,
                "ci95": list(summary.ci95) if summary.ci95 else None,
                "baseline": index == baseline,
                "delta": summary.mean - statistics.fmean(v for _, v in base),  # type: ignore[misc]
                "test": test.name if test else None,
                "p_value": test.p_value if test and test.name == "paired" else None,
                "welch_p_value": test.p_value if test and test.name == "welch" else None,
                "wall_s_mean": statistics.fmean(walls) if walls else None,
                "steps": _steps(steps),
            }
        )
    return out


def _steps(steps: list[int]) -> int | float | None:
    if not steps:
        return None
    return steps[0] if len(set(steps)) == 1 else statistics.fmean(steps)


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits if abs(value) < 100 else 2}f}"


def _p(row: dict[str, Any]) -> str:
    if row["baseline"]:
        return "baseline"
    p = row["p_value"] if row["test"] == "paired" else row["welch_p_value"]
    return f"{_number(p, 3) if p is None or p >= 0.001 else '<0.001'} ({row['test']})"


def cells(row: dict[str, Any]) -> list[str]:
    mean_sd = _number(row["mean"]) + (f" ± {_number(row['sd'])}" if row["sd"] is not None else "")
    ci = f"[{_number(row['ci95'][0])}, {_number(row['ci95'][1])}]" if row["ci95"] else "-"
    delta = "-" if row["baseline"] else f"{row['delta']:+.4f}"
    steps = "-" if row["steps"] is None else f"{row['steps']:g}"
    return [
        row["label"],
        str(row["n"]),
        mean_sd,
        ci,
        delta,
        _p(row),
        _number(row["wall_s_mean"], 1),
        steps,
    ]


def header(metric: str, split: str) -> list[str]:
    return [
        "configuration",
        "n",
        f"{split} {metric} mean ± sd",
        "95% CI",
        "vs baseline",
        "p (test)",
        "wall s",
        "steps",
    ]


def notes(table: Sequence[dict[str, Any]]) -> list[str]:
    """The lines under the table: what the tests are, and why a CI is missing."""
    lines = [
        "95% CI: Student t over seeds; p: two-sided, paired t-test over runs matched by "
        "train.seed (paired), Welch's t-test where the seeds do not pair (welch)"
    ]
    if any(row["n"] < 2 for row in table):
        lines.append("sd and CI need 2+ seeds: '-' where a configuration has one run")
    return lines


def text(table: Sequence[dict[str, Any]]) -> str:
    """An aligned text table (numbers right-aligned) with its notes."""
    grid = [header(table[0]["metric"], table[0]["split"]), *(cells(row) for row in table)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    out = []
    for line in grid:
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        out.append("  ".join(parts).rstrip())
    return "\n".join([*out, "", *notes(table)]) + "\n"


def markdown(table: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with its notes."""
    head = header(table[0]["metric"], table[0]["split"])
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in table:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    return "\n".join([*out, "", *notes(table)]) + "\n"
