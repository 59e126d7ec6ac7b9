"""A unit-normalised index (BuildConfig.normalize = "unit"): every value is S(v, i) / ‖G_i‖, through the first
stage, the exact re-ranking, percentiles, explanations, score-all and index add, against a brute-force reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig
from forvalue.indexer.errors import ConfigError, IndexMismatchError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.score import exact_scores

from indexes import CFG, plain_corpus as corpus
from serving import corpus as serving_corpus

UNIT = dataclasses.replace(CFG, normalize="unit")


def features(lm, samples):
    head = Head.from_model(lm.model)
    return extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples],
                            ForwardConfig(tokens="response"), head), head


def reference(lm, queries, samples):
    """(S / ‖G_i‖ (q, n) float64, S (q, n), ‖G_i‖ (n,)): ‖G_i‖ from the diagonal of the rows' own Gram matrix."""
    (fq, head), (ft, _) = features(lm, queries), features(lm, samples)
    S = exact_scores(fq, ft, head).double()
    norms = exact_scores(ft, ft, head).double().diagonal().clamp(min=0).sqrt()
    return S / norms[None, :], S, norms


@pytest.fixture(scope="module")
def unit60(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("unit")
    samples = corpus(60)
    build_index(str(root), samples, lm, UNIT)
    return root, samples


@pytest.mark.parametrize("direction", ["most", "least"])
def test_search_ranks_by_value_per_unit_norm(unit60, lm, direction):
    root, samples = unit60
    idx = Index.open(str(root), lm)
    assert idx.manifest["normalize"] == "unit"
    queries = corpus(3, seed=9)
    U, S, _ = reference(lm, queries, samples)
    for j, q in enumerate(queries):
        res = idx.search([q], k=5, direction=direction, rerank=len(samples))
        order = torch.argsort(U[j], descending=direction == "most")[:5]
        raw = torch.argsort(S[j], descending=direction == "most")[:5]
        assert [h.id for h in res.hits] == [samples[i].id for i in order.tolist()]
        np.testing.assert_allclose([h.score for h in res.hits], U[j][order].numpy(), rtol=1e-4, atol=1e-6)
        if j == 0:
            assert order.tolist() != raw.tolist()  # the corpus is one where the two orders differ
        assert res.hits[0].percentile == (1.0 if direction == "most" else 0.0)
        found = idx.explain([q], [h.row for h in res.hits], pairs=3)
        np.testing.assert_allclose([e.total for e in found], [h.score for h in res.hits], rtol=1e-4, atol=1e-6)


def test_first_stage_holds_the_sketches_of_unit_gs(unit60, tmp_path, lm):
    """Same corpus and maps: the unit index's sketches are the plain index's divided by ‖G_i‖."""
    root, samples = unit60
    build_index(str(tmp_path), samples, lm, CFG)
    unit, plain = Index.open(str(root), lm), Index.open(str(tmp_path), lm)
    su = unit.version.take("sketch", np.arange(len(samples)))
    sp = plain.version.take("sketch", np.arange(len(samples)))
    _, _, norms = reference(lm, corpus(1), samples)
    np.testing.assert_allclose(su * norms.numpy()[:, None], sp, rtol=1e-3, atol=1e-4)
    # the cosines are the same numbers in both, and the unit index's scores are them times ‖G_query‖
    q = corpus(2, seed=5)
    a, b = unit.scores(q), plain.scores(q)
    np.testing.assert_allclose(a.cosines, b.cosines, rtol=1e-4, atol=1e-6)
    U, _, _ = reference(lm, q, samples)
    np.testing.assert_allclose(a.values, U.mean(0).numpy(), rtol=1e-4, atol=1e-6)


def test_index_add_keeps_unit_values(tmp_path, lm):
    samples = corpus(40)
    build_index(str(tmp_path), samples[:30], lm, UNIT)
    build_index(str(tmp_path), samples[30:], lm, UNIT, base=Index.open(str(tmp_path), lm).version)
    idx = Index.open(str(tmp_path), lm)
    assert idx.n == 40 and idx.manifest["normalize"] == "unit"
    q = corpus(1, seed=7)
    U, _, _ = reference(lm, q, samples)
    res = idx.search(q, k=4, rerank=40)
    order = torch.argsort(U[0], descending=True)[:4]
    assert [h.id for h in res.hits] == [samples[i].id for i in order.tolist()]
    with pytest.raises(IndexMismatchError, match="normalize"):
        build_index(str(tmp_path), serving_corpus(2, seed=3, prefix="z"), lm, CFG, base=idx.version)


def test_unknown_normalization_refused():
    with pytest.raises(ConfigError, match="normalize"):
        BuildConfig(normalize="cosine")


def test_eval_scores_per_unit_norm(lm):
    from forvalue.indexer.config import ScoreConfig
    from forvalue.indexer.score import scores

    samples, queries = corpus(12), corpus(3, seed=4)
    (fq, head), (ft, _) = features(lm, queries), features(lm, samples)
    U, _, _ = reference(lm, queries, samples)
    got = scores(fq, ft, head, ScoreConfig(normalize="unit")).double()
    torch.testing.assert_close(got, U, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="normalize 'unit' needs method 'exact'"):
        ScoreConfig(method="emb", normalize="unit")


def test_recompute_tier_gives_the_stored_tier_unit_answers(unit60, tmp_path, lm):
    root, samples = unit60
    build_index(str(tmp_path), samples, lm, dataclasses.replace(UNIT, rerank_dtype="recompute"))
    stored, again = Index.open(str(root), lm), Index.open(str(tmp_path), lm)
    q = corpus(2, seed=11)
    for direction in ("most", "least"):
        a = stored.search(q, k=5, direction=direction, rerank=20, calibrate=False)
        b = again.search(q, k=5, direction=direction, rerank=20, calibrate=False)
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["most", "least"])
def test_certified_intervals_hold_the_unit_values(unit60, lm, direction):
    root, samples = unit60
    idx = Index.open(str(root), lm)
    q = corpus(1, seed=13)
    U, _, _ = reference(lm, q, samples)
    ids = [s.id for s in samples]
    for budget in (0, 3):
        res = idx.search(q, k=5, direction=direction, rerank=30, scores="certified", exact_budget=budget)
        assert len(res.hits) == 5
        for h in res.hits:
            u = float(U[0, ids.index(h.id)])
            assert h.score_low - 1e-4 * abs(u) <= u <= h.score_high + 1e-4 * abs(u), (h.id, h.score_low, u, h.score_high)
