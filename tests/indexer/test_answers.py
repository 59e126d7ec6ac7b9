"""Answers users act on (issue 10): group-by and calibrated scores (cosine, percentile) of the in-process
Index, against brute force (exact For-Value of every row, grouped / normalised by plain loops). Filters and
deletions have their own modules (test_filters.py, test_deletion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.filters import Where
from forvalue.indexer.index import Index
from forvalue.indexer.score import reference_G

from indexes import CFG, brute_topk, matching

# ------------------------------------------------------------------------------------------- group by


@pytest.mark.parametrize("direction", ["most", "least"])
def test_group_by_equals_brute_force(index, built, exact, direction):
    _, samples = built
    queries, S, _ = exact
    res = index.group_by([queries[0]], "license", k=2, direction=direction)
    assert res.scored == len(samples)
    by: dict = {}
    for i, s in enumerate(samples):
        by.setdefault(s.meta.get("license"), []).append(i)
    assert {g.key for g in res.groups} == set(by)
    totals = [g.total for g in res.groups]
    assert totals == sorted(totals, reverse=direction == "most")
    for g in res.groups:
        members = by[g.key]
        want_total = sum(float(S[0][i]) for i in members)
        assert g.count == len(members)
        assert g.total == pytest.approx(want_total, rel=1e-4, abs=1e-4)
        assert g.mean == pytest.approx(want_total / len(members), rel=1e-4, abs=1e-4)
        assert [h.id for h in g.hits] == [samples[i].id for i in brute_topk(S[0], members, 2, direction)]
    assert sum(g.total for g in res.groups) == pytest.approx(float(S[0].sum()), rel=1e-4, abs=1e-4)


def test_group_by_respects_where_and_max_groups(index, built, exact):
    _, samples = built
    queries, S, _ = exact
    where = Where.parse(["year=2020", "year=2021"])
    res = index.group_by(queries[:2], "source", k=1, where=where, max_groups=2)
    allowed = matching(samples, where)
    assert res.scored == len(allowed) and len(res.groups) == 2
    group_S = S[:2].mean(0)
    totals = {}
    for i in allowed:
        totals[samples[i].meta["source"]] = totals.get(samples[i].meta["source"], 0.0) + float(group_S[i])
    best = sorted(totals.items(), key=lambda t: -t[1])[:2]
    assert [g.key for g in res.groups] == [k for k, _ in best]
    assert [g.total for g in res.groups] == pytest.approx([v for _, v in best], rel=1e-4, abs=1e-4)
    with pytest.raises(ConfigError, match="group_by"):
        index.group_by([queries[0]], "prompt")


# ------------------------------------------------------------------------------------------- calibration


def test_cosine_is_exact_normalised_score(index, built, exact, lm):
    _, samples = built
    queries, S, (fq, ft, head) = exact
    G_q = reference_G(fq.select([0]), head).double()
    G_t = reference_G(ft, head).double()
    res = index.search([queries[0]], k=5, rerank=len(samples))
    for h in res.hits:
        i = h.row
        want = float((G_q.flatten() @ G_t[i].flatten()) / (G_q.norm() * G_t[i].norm()))
        assert h.cosine == pytest.approx(want, abs=1e-4)
    group = index.search(queries, k=3, rerank=len(samples))
    G_mean = reference_G(fq, head).double().mean(0)
    for h in group.hits:
        want = float((G_mean.flatten() @ G_t[h.row].flatten()) / (G_mean.norm() * G_t[h.row].norm()))
        assert h.cosine == pytest.approx(want, abs=1e-4)


def share_lower(values, i):
    """The brute-force percentile of row i: #{j != i : S_j < S_i} / (n - 1)."""
    return float(np.sum(values < values[i])) / (len(values) - 1)


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("q", [0, 1])
def test_percentile_is_exact_against_brute_force(index, built, exact, direction, q):
    _, samples = built
    queries, S, _ = exact
    res = index.search([queries[q]], k=8, direction=direction)
    values = S[q].numpy()
    for h in res.hits:
        want = share_lower(values, h.row)
        assert h.percentile == pytest.approx(want, abs=1e-12)
        assert h.percentile_low == h.percentile_high == h.percentile and h.percentile_exact
    if direction == "most":
        assert res.hits[0].percentile == 1.0 and res.hits[1].percentile == pytest.approx(1 - 1 / (len(samples) - 1))
    else:
        assert res.hits[0].percentile == 0.0


def test_percentile_of_every_row_and_of_a_group(index, built, exact):
    _, samples = built
    queries, S, _ = exact
    res = index.search([queries[2]], k=len(samples), rerank=len(samples))
    assert [h.percentile for h in res.hits] == pytest.approx([share_lower(S[2].numpy(), h.row) for h in res.hits])
    group = index.search(queries, k=4, direction="least")  # the group mean's values
    mean = S.mean(0).numpy()
    assert [h.percentile for h in group.hits] == pytest.approx([share_lower(mean, h.row) for h in group.hits])


def test_percentile_scores_only_rows_the_bounds_leave_undecided(index, built, exact, monkeypatch):
    _, samples = built
    queries, S, _ = exact
    scored = []
    real = Index.score_rows

    def spy(self, features, rows, *args, **kwargs):
        scored.append(len(rows))
        return real(self, features, rows, *args, **kwargs)

    monkeypatch.setattr(Index, "score_rows", spy)
    res = index.search([queries[0]], k=3)
    assert res.hits[0].percentile == 1.0
    assert sum(scored) < len(samples) // 2  # the bounds decide most rows
    # every row the bounds leave undecided is among the candidates the re-ranking scored exactly (its
    # bounds reach the k-th hit's score): with every row a candidate, nothing is scored twice
    monkeypatch.setattr("forvalue.indexer.index.pruning_pays", lambda *a, **kw: True)  # bound first, always
    bounded = []
    real_bounds = Index.value_bounds

    def spy_bounds(self, features, rows, *args, **kwargs):
        bounded.append(len(rows))
        return real_bounds(self, features, rows, *args, **kwargs)

    monkeypatch.setattr(Index, "value_bounds", spy_bounds)
    for direction in ("most", "least"):
        scored.clear()
        res = index.search([queries[1]], k=4, direction=direction, rerank=len(samples))
        assert scored == [] and res.exact_scored < len(samples)
        assert bounded == []  # ... and the re-ranking's bounds of every candidate are reused too
        assert [h.percentile for h in res.hits] == pytest.approx([share_lower(S[1].numpy(), h.row) for h in res.hits])
    res = index.search([queries[1]], k=4, rerank=10)
    assert bounded == [len(samples) - 10]  # only the rows that were not candidates are bounded now
    assert [h.percentile for h in res.hits] == pytest.approx([share_lower(S[1].numpy(), h.row) for h in res.hits])


def test_percentile_without_top_probabilities_scores_every_row(index, built, exact):
    _, samples = built
    queries, S, _ = exact
    plain = Index.__new__(Index)
    plain.__dict__.update(index.__dict__, rerank_top=0, _calibration=None)
    res = plain.search([queries[1]], k=5, direction="least")
    assert [h.percentile for h in res.hits] == pytest.approx([share_lower(S[1].numpy(), h.row) for h in res.hits])


def test_calibrate_false_and_old_index_without_norms(index, exact):
    res = index.search([exact[0][0]], k=2, calibrate=False)
    assert all(h.percentile is None and h.cosine is None and h.percentile_low is None for h in res.hits)
    index_no_norms = Index.__new__(Index)
    index_no_norms.__dict__.update(index.__dict__, g_norm=None)
    assert all(h.cosine is None and h.percentile is not None for h in index_no_norms.search([exact[0][0]], k=2).hits)


def test_percentile_on_large_indexes_counts_in_a_fixed_sample_with_an_interval(built, lm, exact):
    root, samples = built
    idx = Index.open(str(root), lm)
    assert idx.manifest["calibration"] == {"rows": 2048, "seed": CFG.sketch.seed}  # recorded by the build
    idx.manifest["calibration"] = {"rows": 20, "seed": 3}  # as an index of more than 20 rows would have it
    queries, S, _ = exact
    res = idx.search([queries[2]], k=10, rerank=len(samples))
    rows = np.sort(np.random.default_rng(3).choice(np.arange(len(samples)), 20, replace=False))
    assert np.array_equal(idx.calibration_rows()[0], rows) and not idx.calibration_rows()[1]
    values = S[2].numpy()
    for h in res.hits:
        others = rows[rows != h.row]
        want = float(np.sum(values[others] < h.score)) / others.size
        assert h.percentile == pytest.approx(want, abs=1e-12)
        assert h.percentile_low <= h.percentile <= h.percentile_high and not h.percentile_exact
        assert h.percentile_high - h.percentile_low > 0.05  # 20 rows say little: an honest, wide interval
        true = share_lower(values, h.row)
        assert h.percentile_low <= true <= h.percentile_high


def test_an_older_manifests_larger_sample_is_cut_to_the_calibration_rows(built, lm, monkeypatch):
    root, samples = built
    idx = Index.open(str(root), lm)
    idx.manifest["calibration"] = {"rows": 8192, "seed": 3}  # as built when the sample was 8,192 rows
    monkeypatch.setattr("forvalue.indexer.index.CALIBRATION_ROWS", 20)  # ... on an index of more rows than now
    rows = np.sort(np.random.default_rng(3).choice(np.arange(len(samples)), 20, replace=False))
    got, whole = idx.calibration_rows()
    assert np.array_equal(got, rows) and not whole


def test_scores_carry_each_rows_cosine_to_the_group_mean(index, built, exact):
    from forvalue.indexer.score import group_norm

    _, samples = built
    queries, S, (fq, ft, head) = exact
    G_t = reference_G(ft, head).double().flatten(1)
    for members in ([0], [0, 1, 2]):
        G_mean = reference_G(fq.select(members), head).double().mean(0).flatten()
        assert group_norm([fq.select([m]) for m in members], head) == pytest.approx(float(G_mean.norm()), rel=1e-4)
        got = index.scores([queries[m] for m in members], batch=2)  # two forward passes for the group of 3
        want = (G_t @ G_mean) / (G_t.norm(dim=1) * G_mean.norm())
        np.testing.assert_allclose(got.cosines, want.numpy()[got.rows], atol=1e-4)
    plain = Index.__new__(Index)
    plain.__dict__.update(index.__dict__, g_norm=None)
    assert plain.scores([queries[0]]).cosines is None


def test_a_deadline_stops_the_percentile_work(index, exact):
    queries = exact[0]

    def stop_at(n):
        calls = []

        def check():
            calls.append(1)
            if len(calls) >= n:
                raise TimeoutError("deadline")
        return check

    index.search([queries[0]], k=3, rerank=10, calibrate=False, check=stop_at(2))  # one check: the first stage
    with pytest.raises(TimeoutError):
        index.search([queries[0]], k=3, rerank=10, check=stop_at(2))  # the percentiles' rows are checked too
