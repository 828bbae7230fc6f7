"""Intervals and paired tests over seeds, for experiment reports.

Every claim across seeds carries a 95% interval:

1. one cell (an arm at one setting): the mean over seeds with its Student-t interval,
   ``mean +- t(0.975, n-1) * sd / sqrt(n)``;
2. two arms: their difference seed by seed (the same seed's runs answer the same held-out
   questions), its mean with the same t interval over the differences, and the paired
   t-test's two-sided p-value.

One seed gives a mean and no interval; differences that are all equal give a zero-width
interval and p = 0 (1 when they are all zero).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% interval (``None`` below two seeds)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.mean:.3f} (n={self.n})"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class PairedDifference(Interval):
    """Mean of per-seed differences, its interval, and the paired t-test's p-value."""

    p_value: float | None

    def text(self) -> str:
        p = "" if self.p_value is None else f" p={self.p_value:.3g}"
        return f"{self.mean:+.3f}" + (
            "" if self.low is None else f" [{self.low:+.3f}, {self.high:+.3f}]") + p


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of ``values`` (one per seed) with its Student-t 95% interval."""
    if not values:
        raise ValueError("no values to average")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, None, n)
    half = _t_quantile(n) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """``a - b`` over the seeds both have: mean, 95% interval and two-sided p-value."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the two arms share no seed")
    diffs = [a[s] - b[s] for s in seeds]
    interval = mean_interval(diffs)
    p_value = None
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        if sd == 0:
            p_value = 1.0 if interval.mean == 0 else 0.0
        else:
            t = interval.mean / (sd / math.sqrt(len(diffs)))
            p_value = float(2 * scipy_stats.t.sf(abs(t), len(diffs) - 1))
    return PairedDifference(interval.mean, interval.low, interval.high, interval.n, p_value)


def _t_quantile(n: int) -> float:
    return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1))
