"""indexer/calibration.py against plain counting: undecided rows, counts from bounds, Wilson intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forvalue.indexer.calibration import count_lower, percentiles_of, undecided, wilson_interval


def test_bounds_decide_counts_as_brute_force():
    rng = np.random.default_rng(0)
    values = rng.normal(size=300)
    width = rng.uniform(0, 0.3, size=300)
    lo, hi = values - width * rng.uniform(size=300), values + width * rng.uniform(size=300)
    scores = np.sort(values)[-5:]  # the top 5 rows' own values
    todo = undecided(scores, lo, hi)
    brute = np.array([any(lo[j] < s <= hi[j] for s in scores) for j in range(300)])
    assert np.array_equal(todo, brute) and 0 < todo.sum() < 300
    with pytest.raises(ValueError, match="undecided"):
        count_lower(scores, lo, hi)
    lo[todo] = hi[todo] = values[todo]
    assert count_lower(scores, lo, hi).tolist() == [int(np.sum(values < s)) for s in scores]


def test_percentiles_exact_and_sampled():
    assert percentiles_of(np.array([4, 0]), np.array([4, 4]), exact=True) == [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]
    assert percentiles_of(np.array([0]), np.array([0]), exact=True) == [(0.0, 0.0, 0.0)]
    (p, low, high), = percentiles_of(np.array([90]), np.array([100]), exact=False)
    assert p == 0.9 and low < 0.9 < high


def test_wilson_interval_formula():
    # z = 1.96, 8 of 10: the textbook interval (0.490, 0.943)
    low, high = wilson_interval(8, 10, z=1.96)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and low == pytest.approx(1 / (1 + 2.5758**2 / 100), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert not math.isnan(wilson_interval(0, 5)[0])
