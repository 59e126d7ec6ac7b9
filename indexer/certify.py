"""Certified answers: the top-k of candidates known only by certified intervals lo <= S <= hi.

An exact answer needs the exact score of each of its k hits, k · T · |V| · d work (each hit's full next-token
distributions), about one forward pass of the query. The certified bounds of rerank.score_bounds cost a small
part of that. An answer from intervals ranks the candidates by the midpoints of their intervals and says what
the intervals prove. For the most valuable (for the least, the same with the signs turned), with hits
h_1 .. h_k in that order among the candidates c:

- hit h_r's rank is certified when no candidate placed after it can score more and none placed before it less:

      lo(h_r) >= hi(c) for every c after h_r,   hi(h_r) <= lo(c) for every c before h_r,

  so exact re-ranking of the same candidates puts it at the same rank (ties aside: equal scores may swap);
- the set is certified when lo(h) >= hi(c) for every hit h and every candidate c not returned: exact
  re-ranking returns the same k rows, whatever their order.

Where intervals overlap at the k boundary (or between hits), scoring the overlapping candidates exactly (lo = hi)
decides them; `to_tighten` picks which, the widest of the undecided first, within a budget the caller sets.

Pure functions of arrays: no index, no model.
"""

from __future__ import annotations

import numpy as np


def _signed(lo: np.ndarray, hi: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the score to maximise: S for "most", -S for "least"."""
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return (lo, hi) if direction == "most" else (-hi, -lo)


def interval_order(lo: np.ndarray, hi: np.ndarray, direction: str) -> np.ndarray:
    """Candidate positions best first by the midpoints of their intervals (ties: the earlier position) → (c,)."""
    a, b = _signed(lo, hi, direction)
    return np.argsort(-(a + b) / 2, kind="stable")


def certified_ranks(lo: np.ndarray, hi: np.ndarray, order: np.ndarray, k: int, direction: str
                    ) -> tuple[np.ndarray, bool]:
    """What the intervals prove of the answer `order[:k]` → (per hit: its rank is certified (k,) bool,
    the set of k hits is certified).

    Args:
        lo, hi: (c,) certified bounds of every candidate's score (lo = hi where scored exactly).
        order: (c,) candidate positions best first (`interval_order`). k: hits returned.
    """
    a, b = _signed(lo, hi, direction)
    a, b = a[order], b[order]
    c = a.size
    k = min(k, c)
    # best upper bound of the candidates after each position, worst lower bound of those before it
    after = np.full(c, -np.inf)
    if c > 1:
        after[:-1] = np.maximum.accumulate(b[::-1])[::-1][1:]
    before = np.full(c, np.inf)
    if c > 1:
        before[1:] = np.minimum.accumulate(a)[:-1]
    ranks = (a >= after) & (b <= before)
    whole = k >= c or bool(a[:k].min() >= b[k:].max())
    return ranks[:k], whole


def to_tighten(lo: np.ndarray, hi: np.ndarray, k: int, direction: str, budget: int,
               exact: np.ndarray | None = None) -> np.ndarray:
    """Candidates worth scoring exactly, at most `budget`, most useful first → (m,) positions.

    First those whose intervals overlap at the k boundary (a hit that some left-out candidate may beat, and
    such left-out candidates), then the hits whose ranks are not certified; the widest interval first in each
    group. Candidates already scored exactly (`exact`, (c,) bool) or with lo = hi are never picked.
    """
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    a, b = _signed(lo, hi, direction)
    order = interval_order(lo, hi, direction)
    k = min(k, order.size)
    hits, rest = order[:k], order[k:]
    open_ = b > a
    if exact is not None:
        open_ &= ~np.asarray(exact, dtype=bool)
    picked: list[np.ndarray] = []
    if rest.size:
        top_out, low_in = b[rest].max(), a[hits].min()
        boundary = np.concatenate([hits[a[hits] < top_out], rest[b[rest] > low_in]])
        picked.append(boundary[np.argsort(-(b - a)[boundary], kind="stable")])
    ranks, _ = certified_ranks(lo, hi, order, k, direction)
    loose = hits[~ranks]
    picked.append(loose[np.argsort(-(b - a)[loose], kind="stable")])
    out = np.concatenate(picked).astype(np.int64)
    _, first = np.unique(out, return_index=True)
    out = out[np.sort(first)]
    return out[open_[out]][:budget]
