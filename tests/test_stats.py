"""Intervals and paired tests over seeds against known cases and scipy's own test."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats as scipy_stats

from archkit.experiment import beyond_edge
from archkit.experiment_report import threshold
from archkit.stats import mean_interval, paired_difference


def test_the_mean_interval_is_the_textbook_t_interval() -> None:
    # 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445
    interval = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == 3.0 and interval.n == 5
    assert interval.low == pytest.approx(3 - half, abs=1e-5)
    assert interval.high == pytest.approx(3 + half, abs=1e-5)
    one = mean_interval([0.4])
    assert one.mean == 0.4 and one.low is None and one.high is None
    with pytest.raises(ValueError):
        mean_interval([])


@pytest.mark.parametrize("seed", range(5))
def test_the_paired_difference_matches_scipys_paired_t_test(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 8)
    a = {s: rng.random() for s in range(n)}
    b = {s: a[s] - 0.1 + 0.2 * rng.random() for s in range(n)}
    b[99] = 0.5  # a seed only one arm has is not a pair
    diff = paired_difference(a, b)
    reference = scipy_stats.ttest_rel([a[s] for s in range(n)], [b[s] for s in range(n)])
    assert diff.n == n
    assert diff.mean == pytest.approx(sum(a[s] - b[s] for s in range(n)) / n)
    assert diff.p_value == pytest.approx(reference.pvalue)
    assert diff.low < diff.mean < diff.high


def test_equal_differences_have_no_spread_and_a_clear_p() -> None:
    same = paired_difference({0: 0.5, 1: 0.7}, {0: 0.5, 1: 0.7})
    assert (same.mean, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    shifted = paired_difference({0: 0.75, 1: 1.0}, {0: 0.5, 1: 0.75})
    assert shifted.p_value == 0.0 and shifted.low == shifted.high == 0.25
    with pytest.raises(ValueError):
        paired_difference({0: 1.0}, {1: 1.0})


def test_a_rate_on_the_edge_is_followed_by_one_geometric_step_beyond() -> None:
    values = [1e-3, 2e-3, 4e-3]
    assert beyond_edge(values, {1e-3: 0.1, 2e-3: 0.5, 4e-3: 0.3}) is None
    assert beyond_edge(values, {1e-3: 0.1, 2e-3: 0.5, 4e-3: 0.6}) == pytest.approx(8e-3)
    assert beyond_edge(values, {1e-3: 0.7, 2e-3: 0.5, 4e-3: 0.3}) == pytest.approx(5e-4)
    # a tie goes to the smaller rate
    assert beyond_edge(values, {1e-3: 0.5, 2e-3: 0.5, 4e-3: 0.1}) == pytest.approx(5e-4)


def test_the_threshold_is_the_largest_value_solved_above_chance_and_margin() -> None:
    def cell(value: int, low: float | None, mean: float, chance: float) -> dict:
        return {"value": value, "baseline": {"baseline": {"mean": chance}},
                "arms": {"N1": {"trained": {"exact": {"mean": mean, "low": low}}}}}

    cells = [cell(2, 0.80, 0.9, 0.3), cell(4, 0.45, 0.6, 0.3), cell(6, 0.35, 0.5, 0.3),
             cell(8, None, 0.5, 0.3)]  # 8: one seed, its mean counts
    assert threshold(cells, "N1", margin=0.1) == 8
    assert threshold(cells[:3], "N1", margin=0.1) == 4  # 0.35 is not above 0.3 + 0.1
    assert threshold(cells[:3], "N1", margin=0.6) is None
    assert threshold(cells, "N2", margin=0.1) is None  # an arm that never ran
