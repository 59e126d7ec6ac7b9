"""Percentiles of hits among the values of a corpus: exact counts from certified bounds, or an interval.

The percentile of a training row i for a query is the share of the other rows whose exact value to the query
is strictly lower,

    p_i = #{j in R, j != i : S_j < S_i} / (|R| - 1),

R the index's live (not deleted) rows: 1.0 for the most valuable row, 0.0 for the least, the same number
`rank` writes for the row (selection.rank_scores). A hit's exact score S_i is known (the re-ranking computed
it); each other row's S_j need only be known to be below S_i or not, and certified bounds lo_j <= S_j <= hi_j
(rerank.score_bounds) decide that for every row whose interval does not contain S_i. Only the rows left
undecided (lo_j < S_i <= hi_j: for the top hits, the few rows near the top) are scored exactly, so the count
is exact at the cost of a bound per row. On indexes larger than the calibration sample, R is a seeded sample
and the count gives an estimate with a Wilson score interval.

Pure functions of arrays: no index, no model.
"""

from __future__ import annotations

import math

import numpy as np

Z99 = 2.5758  # the normal quantile of a two-sided 99% interval


def undecided(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rows whose bounds do not tell whether they are below every hit score → (r,) bool.

    Args:
        scores: (m,) exact scores of the hits. lo, hi: (r,) certified bounds of the rows' values.

    Returns:
        True where some hit score s has lo_j < s <= hi_j (S_j < s can be true or false).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    within = np.searchsorted(s, hi, "right") - np.searchsorted(s, lo, "right")
    return within > 0


def count_lower(scores: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """#{j : S_j < s} for every hit score s → (m,) int64, from bounds that decide every row for every s.

    Args:
        scores: (m,) hit scores. lo, hi: (r,) bounds with lo <= S <= hi (lo = hi = S where exact).

    Raises:
        ValueError: a row is undecided for some score (score it exactly first; see `undecided`).
    """
    s = np.asarray(scores, dtype=np.float64)
    surely = np.searchsorted(np.sort(hi), s, "left")  # hi_j < s
    maybe = np.searchsorted(np.sort(lo), s, "left")  # lo_j < s
    if np.any(surely != maybe):
        raise ValueError("count_lower: some rows are undecided for a score; score them exactly first")
    return surely.astype(np.int64)


def wilson_interval(count: int, size: int, z: float = Z99) -> tuple[float, float]:
    """The Wilson score interval of a proportion count / size (size draws without bias) → (low, high)."""
    if size <= 0:
        return 0.0, 1.0
    p = count / size
    denom = 1 + z * z / size
    centre = (p + z * z / (2 * size)) / denom
    half = z * math.sqrt(p * (1 - p) / size + z * z / (4 * size * size)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentiles_of(counts: np.ndarray, sizes: np.ndarray, exact: bool, z: float = Z99
                   ) -> list[tuple[float, float, float]]:
    """(percentile, low, high) of each hit from its count of lower rows among `sizes` other rows.

    Args:
        counts: (m,) rows below each hit. sizes: (m,) the other rows counted among (|R| minus the hit itself
            where it is in R). exact: R is the whole corpus (low = high = the percentile); else a uniform
            sample of it, and (low, high) is the Wilson interval at the normal quantile z.
    """
    out = []
    for c, n in zip(np.asarray(counts).tolist(), np.asarray(sizes).tolist()):
        p = c / max(n, 1)  # a corpus of one row: 0.0, as selection.rank_scores
        out.append((p, p, p) if exact else (p, *wilson_interval(c, n, z)))
    return out
