"""The statistics of a comparison over seeds: mean, sample sd, a Student-t confidence interval and
two-sided t-tests (paired when the seeds match, Welch's otherwise).

scipy (the ``compare`` extra) supplies the t distribution; it is imported inside the functions so
that importing this module costs nothing. A statistic that is undefined (one value, no spread) is
``None``, never NaN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nestrnn.errors import UserError

EXTRA = "compare"


def scipy_stats() -> Any:
    """``scipy.stats``; a UserError naming the extra when scipy is missing."""
    try:
        from scipy import stats
    except ImportError:
        raise UserError(
            f"comparing runs needs scipy: pip install 'nestrnn[{EXTRA}]' (or scipy>=1.10)"
        ) from None
    return stats


@dataclass(frozen=True)
class Summary:
    """What a sample of per-seed values says: ``sd`` and ``ci95`` need two values or more."""

    n: int
    mean: float
    sd: float | None
    ci95: tuple[float, float] | None


def describe(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample standard deviation (n - 1) and the Student-t interval for the mean."""
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None)
    sd = statistics.stdev(values)
    half = scipy_stats().t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, (mean - half, mean + half))


@dataclass(frozen=True)
class Test:
    """A two-sided test of equal means: ``name`` is ``"paired"`` or ``"welch"``."""

    name: str
    p_value: float | None


def _finite(p: float) -> float | None:
    return float(p) if math.isfinite(p) else None


def paired_t(values: Sequence[float], baseline: Sequence[float]) -> Test:
    """Paired t-test of ``values[i]`` against ``baseline[i]`` (the same seed); the p-value is
    None with fewer than 2 pairs or when the differences are all equal (no spread to test)."""
    if len(values) != len(baseline):
        raise ValueError("paired samples differ in length")
    differences = [a - b for a, b in zip(values, baseline)]
    if len(differences) < 2 or max(differences) == min(differences):
        return Test("paired", None)
    return Test("paired", _finite(scipy_stats().ttest_rel(values, baseline).pvalue))


def welch_t(values: Sequence[float], baseline: Sequence[float]) -> Test:
    """Welch's t-test (unequal variances); None with fewer than 2 values on a side or no
    spread on either side."""
    if len(values) < 2 or len(baseline) < 2:
        return Test("welch", None)
    if statistics.stdev(values) == 0 and statistics.stdev(baseline) == 0:
        return Test("welch", None)
    result = scipy_stats().ttest_ind(values, baseline, equal_var=False)
    return Test("welch", _finite(result.pvalue))


def compare_seeds(
    values: Sequence[tuple[int | None, float]], baseline: Sequence[tuple[int | None, float]]
) -> Test:
    """The test of one configuration's ``(seed, value)`` pairs against the baseline's: paired
    when both ran the same seeds, each once (two or more), Welch's t-test otherwise."""
    mine, theirs = dict(values), dict(baseline)
    paired = (
        len(mine) == len(values) >= 2
        and len(theirs) == len(baseline)
        and set(mine) == set(theirs)
        and None not in mine
    )
    if paired:
        seeds = sorted(mine)  # type: ignore[type-var]
        return paired_t([mine[s] for s in seeds], [theirs[s] for s in seeds])
    return welch_t([v for _, v in values], [v for _, v in baseline])
