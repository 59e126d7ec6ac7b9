"""Certified answers: the intervals contain the exact scores (float64 reference), the order and set claims are
never wrong (randomised), and the tightening scores exactly only what it may."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer.build import build_index
from forvalue.indexer.certify import certified_ranks, interval_order, to_tighten
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.errors import ConfigError
from forvalue.indexer.features import Features, Head
from forvalue.indexer.index import Index
from forvalue.indexer.score import exact_scores

from indexes import top_probability_config
from serving import corpus


def claims_hold(S, lo, hi, k, direction):
    """Check every claim certified_ranks makes for intervals [lo, hi] around exact scores S."""
    order = interval_order(lo, hi, direction)
    ranks, whole = certified_ranks(lo, hi, order, k, direction)
    key = S if direction == "most" else -S
    k = min(k, S.size)
    hits = order[:k]
    for r in np.flatnonzero(ranks):
        i = hits[r]
        # every candidate placed after it scores at most as much, every one before it at least as much
        assert (key[order[r + 1:]] <= key[i]).all() and (key[order[:r]] >= key[i]).all()
    if whole and k < S.size:
        assert key[hits].min() >= key[order[k:]].max()
    return ranks, whole


@pytest.mark.parametrize("direction", ["most", "least"])
def test_certified_claims_are_never_wrong(direction):
    rng = np.random.default_rng(0)
    claimed = [0, 0]
    for trial in range(3000):
        c, k = int(rng.integers(1, 25)), int(rng.integers(1, 8))
        S = rng.normal(size=c)
        if trial % 3 == 0:
            S = np.round(S, 1)  # ties
        width = rng.random(c) * rng.choice([0.01, 0.3, 2.0])
        width[rng.random(c) < 0.3] = 0.0  # some scored exactly
        below = rng.random(c)
        lo, hi = S - width * below, S + width * (1 - below)
        ranks, whole = claims_hold(S, lo, hi, k, direction)
        claimed[0] += int(ranks.sum())
        claimed[1] += int(whole)
    assert claimed[0] > 1000 and claimed[1] > 300  # the claims were made, not just never wrong


def test_separated_intervals_certify_everything_and_overlaps_do_not():
    S = np.arange(10, dtype=np.float64)
    ranks, whole = certified_ranks(S - 0.1, S + 0.1, interval_order(S - 0.1, S + 0.1, "most"), 3, "most")
    assert ranks.all() and whole
    lo, hi = S - 0.1, S + 0.1
    lo[6], hi[6] = 4.0, 9.5  # row 6 (midpoint 6.75, placed 4th) may beat each of the top 3
    order = interval_order(lo, hi, "most")
    ranks, whole = certified_ranks(lo, hi, order, 3, "most")
    assert list(order[:3]) == [9, 8, 7] and not ranks.any() and not whole
    pick = to_tighten(lo, hi, 3, "most", 1)
    assert list(pick) == [6]  # the widest at the boundary
    assert to_tighten(lo, hi, 3, "most", 5, exact=np.arange(10) == 6).size < 5
    assert to_tighten(lo, hi, 3, "most", 0).size == 0


@pytest.mark.parametrize("direction", ["most", "least"])
def test_tightening_everything_it_picks_certifies_the_set(direction):
    rng = np.random.default_rng(1)
    for _ in range(300):
        c, k = int(rng.integers(2, 20)), int(rng.integers(1, 6))
        S = rng.normal(size=c)
        w = rng.random(c)
        lo, hi = S - w, S + w
        exact = np.zeros(c, dtype=bool)
        while True:
            pick = to_tighten(lo, hi, k, direction, c, exact)
            assert not exact[pick].any() and np.unique(pick).size == pick.size
            if not pick.size:
                break
            lo[pick] = hi[pick] = S[pick]
            exact[pick] = True
        ranks, whole = claims_hold(S, lo, hi, k, direction)
        assert ranks.all() and (whole or k >= c)


@pytest.fixture(scope="module")
def bounded_index(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("certified")
    build_index(str(root), corpus(40), lm, top_probability_config(40))
    idx = Index.open(str(root), lm)
    idx.query_top = 4  # |V| = 128: few known probabilities, so the intervals are wide and the test has work
    return idx


def reference64(idx, f, rows):
    """Exact group-mean scores in float64 of the stored hidden states (log-partitions recomputed in float64)."""
    head = Head.from_model(idx.lm.model, torch.float64)
    ft = idx.candidate_features(rows)
    fv64 = Features(f.h.double(), f.y, head.logsumexp(f.h.double()), f.offsets)
    ft64 = Features(ft.h.double(), ft.y, head.logsumexp(ft.h.double()), ft.offsets)
    return exact_scores(fv64, ft64, head).mean(0).numpy()


@pytest.mark.parametrize("direction", ["most", "least"])
def test_certified_search_intervals_contain_float64_scores_and_claims_hold(bounded_index, direction):
    idx = bounded_index
    every = np.arange(idx.n)
    seen = {"ranks": 0, "set": 0, "same_set": 0}
    for seed in range(8):
        q = [(s.prompt, s.response) for s in corpus(1 + seed % 3, seed=200 + seed, prefix="q")]
        f = idx.encode(q)
        S = reference64(idx, f, every)
        exact = idx.search([], 5, direction, idx.n, features=f, prune=False)
        for budget in (0, 1, 4):
            res = idx.search([], 5, direction, idx.n, features=f, scores="certified", exact_budget=budget)
            assert res.scores == "certified" and res.exact_scored <= budget and res.candidates == idx.n
            rows = np.array([h.row for h in res.hits])
            lo = np.array([h.score_low for h in res.hits])
            hi = np.array([h.score_high for h in res.hits])
            assert (lo <= S[rows]).all() and (S[rows] <= hi).all(), (seed, budget)
            assert all(h.percentile is None and h.cosine is None for h in res.hits)
            key = S if direction == "most" else -S
            for r, h in enumerate(res.hits):  # a certified rank is the rank in the exact order of all rows
                if h.rank_certified:
                    assert (key > key[h.row]).sum() <= r <= (key >= key[h.row]).sum() - 1
                    seen["ranks"] += 1
            if res.set_certified:
                assert {h.row for h in res.hits} == {h.row for h in exact.hits}
                seen["set"] += 1
            seen["same_set"] += {h.row for h in res.hits} == {h.row for h in exact.hits}
            assert res.certified_prefix == next((i for i, h in enumerate(res.hits) if not h.rank_certified), 5)
    assert seen["ranks"] > 0 and seen["set"] > 0


def test_certified_budget_tightens_and_exact_stays_the_default(bounded_index):
    idx = bounded_index
    f = idx.encode(corpus(1, seed=300, prefix="q"))
    plain = idx.search([], 5, "most", 30, features=f)
    assert plain.scores == "exact" and plain.set_certified is None and plain.hits[0].score_low is None
    widths = []
    for budget in (0, 30):
        res = idx.search([], 5, "most", 30, features=f, scores="certified", exact_budget=budget)
        widths.append(sum(h.score_high - h.score_low for h in res.hits))
    full = idx.search([], 5, "most", 30, features=f, scores="certified", exact_budget=30)
    assert widths[1] < widths[0]
    # with budget for every overlap, the answer is the exact one, certified (hits never overlapping anything
    # keep their intervals)
    assert full.set_certified and all(h.rank_certified for h in full.hits)
    assert [h.row for h in full.hits] == [h.row for h in plain.hits]
    assert all(h.score_low <= p.score <= h.score_high for h, p in zip(full.hits, plain.hits))
    with pytest.raises(ConfigError, match="scores"):
        idx.search([], 5, "most", 30, features=f, scores="bounds")
    with pytest.raises(ConfigError, match="exact_budget"):
        idx.search([], 5, "most", 30, features=f, scores="certified", exact_budget=-1)


def test_certified_without_top_probabilities_is_exact(tmp_path, lm):
    cfg = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=20), rerank_top=0)
    build_index(str(tmp_path), corpus(20), lm, cfg)
    idx = Index.open(str(tmp_path), lm)
    q = corpus(1, seed=5, prefix="q")
    res = idx.search(q, k=3, rerank=10, scores="certified")
    ex = idx.search(q, k=3, rerank=10)
    assert res.set_certified and all(h.rank_certified and h.score_low == h.score_high for h in res.hits)
    assert [h.row for h in res.hits] == [h.row for h in ex.hits]


@pytest.mark.parametrize("scores", ["exact", "certified"])
def test_search_with_the_pass_distributions_equals_search_recomputing_them(bounded_index, scores):
    import dataclasses

    idx = bounded_index
    f = idx.encode(corpus(2, seed=400, prefix="q"))
    assert f.probs is not None  # an index's query pass keeps them (they fit)
    a = idx.search([], 5, "most", 30, features=f, scores=scores)
    b = idx.search([], 5, "most", 30, features=dataclasses.replace(f, probs=None), scores=scores)
    assert [h.row for h in a.hits] == [h.row for h in b.hits]
    np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-5, atol=1e-5)
    if scores == "exact":
        np.testing.assert_allclose([h.cosine for h in a.hits], [h.cosine for h in b.hits], rtol=1e-5, atol=1e-6)
        assert [h.percentile for h in a.hits] == [h.percentile for h in b.hits]
