"""Pruned exact re-ranking: top probabilities against brute force, certified bounds around the exact
score, and the pruned answer equal to scoring every candidate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from forvalue.indexer import index as index_mod
from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.rerank import Candidates, RowProbs, must_score, score_bounds
from forvalue.indexer.score import exact_scores
from forvalue.indexer.sketch import bucket_residuals, vocab_pass

from indexes import top_probability_config
from serving import corpus


@pytest.fixture(scope="module")
def feats(model64, tokenizer, texts):
    f = extract_features(model64, tokenizer, texts, ForwardConfig(tokens="all", dtype=torch.float64))
    return f, Head.from_model(model64, torch.float64)


def maps(head, m=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(0, m, (head.vocab_size,), generator=g)
    sign = (torch.randint(0, 2, (head.vocab_size,), generator=g) * 2 - 1).double()
    return bucket, sign, m


def brute_top(h, lse, head, top):
    pi = torch.exp(head.logits(h) - lse[:, None])
    p, ids = torch.sort(pi, dim=1, descending=True, stable=True)
    return ids[:, :top], p[:, :top], p[:, top:].square().sum(1).sqrt()


@pytest.mark.parametrize("top, chunk, rows", [(5, 7, 3), (12, 128, 512), (1, 50, 2), (128, 40, 4), (40, 30, 5)])
def test_vocab_pass_top_probabilities_equal_brute_force(feats, top, chunk, rows):
    f, head = feats
    bucket, sign, m = maps(head)
    lse, res, tp, _ = vocab_pass(f.h, f.y, head, bucket, sign, m, top, chunk, rows)
    lse0, res0 = bucket_residuals(f.h, f.y, head, bucket, sign, m, chunk, rows)
    torch.testing.assert_close((lse, res), (lse0, res0), atol=1e-12, rtol=1e-12)
    ids, p, tail = brute_top(f.h, lse, head, top)
    torch.testing.assert_close(tp.probs, p, atol=1e-12, rtol=1e-10)
    # ids equal where probabilities are not tied
    assert (head.weight.shape[0] >= top) and (tp.ids == ids).float().mean() > 0.99
    torch.testing.assert_close(tp.tail_l2, tail, atol=1e-12, rtol=1e-8)
    if top == head.vocab_size:
        assert float(tp.tail_l2.abs().max()) == 0.0


def candidates_of(ft, head, top) -> Candidates:
    ids, p, tail = brute_top(ft.h, ft.lse, head, top)
    return Candidates(ft, ids, p, tail)


@pytest.mark.parametrize("top, query_top", [(4, 4), (16, 8), (1, 1), (40, 64)])
def test_bounds_contain_exact_scores(feats, top, query_top):
    f, head = feats
    fv, ft = f.select([0, 3, 5]), f.select([1, 2, 4, 6])
    lo, hi = score_bounds(fv, candidates_of(ft, head, top), head, query_top, token_block=5)
    S = exact_scores(fv, ft, head)
    assert (lo <= S).all() and (S <= hi).all()
    assert (hi - lo).max() > 0


def test_bounds_are_tight_when_everything_is_known(feats):
    f, head = feats
    fv, ft = f.select([0, 3]), f.select([1, 2, 4])
    lo, hi = score_bounds(fv, candidates_of(ft, head, head.vocab_size), head, 8)
    S = exact_scores(fv, ft, head)
    scale = (fv.h.abs().sum() * ft.h.abs().sum()).item()  # bounds Σ|<h, h'>|
    assert (hi - lo).max() <= 3e-4 * scale
    assert (lo <= S).all() and (S <= hi).all()


@pytest.mark.parametrize("direction", ["most", "least"])
def test_must_score_keeps_every_possible_member(direction):
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, k = int(torch.randint(2, 30, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g))
        exact = torch.randn(n, generator=g, dtype=torch.float64)
        lo = exact - torch.rand(n, generator=g, dtype=torch.float64) * 0.5
        hi = exact + torch.rand(n, generator=g, dtype=torch.float64) * 0.5
        keep = must_score(lo, hi, k, direction)
        top = torch.argsort(exact, descending=direction == "most")[: min(k, n)]
        assert keep[top].all(), (trial, n, k)
        assert int(keep.sum()) >= min(k, n)
    # tight, separated intervals keep exactly k
    exact = torch.arange(10, dtype=torch.float64)
    assert int(must_score(exact - 0.1, exact + 0.1, 3, direction).sum()) == 3


@pytest.fixture(scope="module")
def pruned_index(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("pruned")
    build_index(str(root), corpus(60), lm, top_probability_config(60))
    return Index.open(str(root), lm)


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("n_queries", [1, 3])
def test_pruned_search_equals_scoring_every_candidate(pruned_index, monkeypatch, direction, n_queries):
    monkeypatch.setattr(index_mod, "pruning_pays", lambda *a, **k: True)  # |V| = 128: never pays by cost
    pruned_index.query_top = 4
    scored = []
    for seed in range(6):
        q = [(s.prompt, s.response) for s in corpus(n_queries, seed=100 + seed, prefix="q")]
        f = pruned_index.encode(q)
        a = pruned_index.search([], 5, direction, 40, features=f, prune=True)
        b = pruned_index.search([], 5, direction, 40, features=f, prune=False)
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-5, atol=1e-5)
        assert b.exact_scored == 40 and 5 <= a.exact_scored <= 40
        scored.append(a.exact_scored)
    assert min(scored) < 40  # the bounds did rule candidates out


def test_index_without_top_probabilities_scores_every_candidate(tmp_path, lm):
    cfg = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=20), rerank_top=0)
    build_index(str(tmp_path), corpus(20), lm, cfg)
    idx = Index.open(str(tmp_path), lm)
    assert idx.rerank_top == 0 and "top_p" not in idx.version.arrays
    res = idx.search(corpus(1, seed=5, prefix="q"), k=3, rerank=10)
    assert res.exact_scored == 10


def test_stored_top_probabilities_match_the_stored_hidden_states(pruned_index):
    idx = pruned_index
    c = idx.candidates(np.arange(idx.n))
    ids, p, tail = brute_top(c.feats.h, c.feats.lse, idx._cpu_head, idx.rerank_top)
    torch.testing.assert_close(c.top_p, p, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.tail_l2, tail, rtol=1e-3, atol=1e-6)


def test_query_distributions_computed_once_give_the_same_sketch_bounds_and_scores(feats):
    from forvalue.indexer.sketch import Sketcher

    f, head = feats
    bucket, sign, m = maps(head)
    projection = torch.linalg.qr(torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0].T
    sk = Sketcher(projection.contiguous(), bucket, sign, m)
    fv, ft = f.select([0, 3, 5]), f.select([1, 2, 4, 6])
    P = head.probs(fv.h, fv.lse)
    torch.testing.assert_close(sk.sketch(fv, head, probs=P), sk.sketch(fv, head), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(exact_scores(fv, ft, head, strategy="pairs", pv=P),
                               exact_scores(fv, ft, head, strategy="pairs"), atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(exact_scores(fv, ft, head, strategy="pairs", memory_mb=1, pv=P),
                               exact_scores(fv, ft, head, strategy="gram"), atol=1e-9, rtol=1e-9)
    c = candidates_of(ft, head, 6)
    torch.testing.assert_close(score_bounds(fv, c, head, 4, probs=P), score_bounds(fv, c, head, 4))


# --- training rows' distributions shared by the searches of a batch (RowProbs) -------------------------------


def test_select_of_a_range_equals_the_gather(feats):
    f, head = feats
    f = dataclasses.replace(f, probs=head.probs(f.h, f.lse), cut=tuple(j % 2 == 0 for j in range(f.n)))
    for a, b in [(0, f.n), (1, 4), (2, 3), (3, 3)]:
        view, gather = f.select(range(a, b)), f.select(list(range(a, b)))
        for name in ("h", "y", "lse", "offsets", "probs"):
            assert torch.equal(getattr(view, name), getattr(gather, name)), name
        assert view.cut == gather.cut and view.n == b - a


def test_row_probs_attach_equals_the_head_and_shares_rows(feats):
    f, head = feats
    shared = RowProbs(head)
    first = shared.attach(f.select([4, 1, 2]), [40, 10, 20])
    torch.testing.assert_close(first.probs, head.probs(first.h, first.lse), rtol=1e-12, atol=1e-14)
    assert shared.computed_tokens == first.h.shape[0] and shared.reused_tokens == 0
    # rows 10 and 20 again, row 30 new: only row 30's tokens are computed
    again = shared.attach(f.select([2, 3, 1]), [20, 30, 10])
    torch.testing.assert_close(again.probs, head.probs(again.h, again.lse), rtol=1e-12, atol=1e-14)
    assert shared.computed_tokens == first.h.shape[0] + int(f.lengths[3])
    assert shared.reused_tokens == int(f.lengths[2] + f.lengths[1])
    # exact scores from attached distributions equal those computed by vocabulary chunks, both strategies
    fv = f.select([0, 5])
    torch.testing.assert_close(exact_scores(fv, again, head), exact_scores(fv, f.select([2, 3, 1]), head, strategy="gram"),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact_scores(fv, again, head, pv=head.probs(fv.h, fv.lse), memory_mb=1),
                               exact_scores(fv, f.select([2, 3, 1]), head), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="rows"):
        shared.attach(f.select([0]), [1, 2])


def test_row_probs_respects_its_memory(feats):
    f, head = feats
    per_token = head.vocab_size * 8
    one = f.select([0])
    kept = RowProbs(head, memory_bytes=per_token * int(f.lengths[0]))  # room for row 0 only
    kept.attach(f.select([0, 1]), [0, 1])
    out = kept.attach(f.select([1, 0]), [1, 0])
    assert kept.computed_tokens == int(f.lengths[0] + 2 * f.lengths[1])  # row 1 was not kept, row 0 was
    torch.testing.assert_close(out.probs, head.probs(out.h, out.lse), rtol=1e-12, atol=1e-14)
    small = RowProbs(head, call_bytes=per_token * (one.h.shape[0] - 1))  # a call larger than that: nothing attached
    assert small.attach(one, [0]).probs is None and small.computed_tokens == 0


@pytest.mark.parametrize("scores", ["exact", "certified"])
def test_searches_sharing_row_probs_answer_as_alone(pruned_index, monkeypatch, scores):
    monkeypatch.setattr(index_mod, "pruning_pays", lambda *a, **k: True)
    idx = pruned_index
    idx.query_top = 4
    q = [(s.prompt, s.response) for s in corpus(6, seed=300, prefix="q")]
    f = idx.encode(q)
    shared = idx.row_probs()
    for j in range(f.n):
        for direction in ("most", "least"):
            got = idx.search([], 5, direction, 40, features=f.select([j]), scores=scores, exact_budget=3,
                             shared=shared, explain=2)
            want = idx.search([], 5, direction, 40, features=f.select([j]), scores=scores, exact_budget=3, explain=2)
            assert [h.row for h in got.hits] == [h.row for h in want.hits]
            np.testing.assert_allclose([h.explanation.total for h in got.hits],
                                       [h.explanation.total for h in want.hits], rtol=1e-5, atol=1e-6)
            for name in ("score", "score_low", "score_high", "percentile", "cosine"):
                a, b = [getattr(h, name) for h in got.hits], [getattr(h, name) for h in want.hits]
                if a[0] is None:
                    assert b[0] is None
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert shared.reused_tokens > 0  # the six queries did share rows


def test_prefill_computes_each_row_once_within_memory(feats):
    f, head = feats
    shared = RowProbs(head)
    needs = [(f.select([0, 2]), [10, 30]), (f.select([2, 3]), [30, 40]), (f.select([0]), [10])]
    shared.prefill(needs)
    union = int(f.lengths[0] + f.lengths[2] + f.lengths[3])
    assert shared.computed_tokens == union and shared.reused_tokens == 0
    for ft, rows in needs:  # every search then finds its rows computed, equal to the head's
        got = shared.attach(ft, rows)
        torch.testing.assert_close(got.probs, head.probs(got.h, got.lse), rtol=1e-12, atol=1e-14)
    # rows 30 and 10 were asked for a second time
    assert shared.computed_tokens == union and shared.reused_tokens == int(f.lengths[2] + f.lengths[0])
    # products of at most call_bytes, and nothing past memory_bytes
    per_token = head.vocab_size * 8
    small = RowProbs(head, memory_bytes=per_token * int(f.lengths[0]), call_bytes=per_token * int(f.lengths[0]))
    small.prefill([(f.select([0, 1]), [0, 1])])
    assert small.computed_tokens == int(f.lengths[0])  # row 1 did not fit: left for attach


def test_run_pass_answers_as_alone_and_keeps_errors_apart(pruned_index, monkeypatch):

    monkeypatch.setattr(index_mod, "pruning_pays", lambda *a, **k: True)
    idx = pruned_index
    idx.query_top = 4
    q = [(s.prompt, s.response) for s in corpus(5, seed=400, prefix="q")]
    f = idx.encode(q)

    def stop():
        raise RuntimeError("stopped")

    shared = idx.row_probs()
    steps = [idx.answer_steps(f.select([j]), 4, ("most", "least"), 30, shared=shared) for j in range(f.n)]
    steps.insert(2, idx.answer_steps(f.select([0]), 4, ("most",), 30, check=stop, shared=shared))
    steps.append(idx.answer_steps(f, 4, ("most",), 30, group=False, shared=shared))  # one answer per sample
    got = idx.run_pass(steps, shared)
    assert got[2][0] is None and str(got[2][1]) == "stopped"
    alone = [idx.answers(f.select([j]), 4, ("most", "least"), 30) for j in range(f.n)]
    alone.insert(2, None)
    alone.append(idx.answers(f, 4, ("most",), 30, group=False))
    for (answer, error), want in zip(got, alone):
        if want is None:
            continue
        assert error is None
        assert [(q, r.direction, [h.row for h in r.hits]) for q, r in answer] == \
            [(q, r.direction, [h.row for h in r.hits]) for q, r in want]
        for (_, r), (_, w) in zip(answer, want):
            np.testing.assert_allclose([h.score for h in r.hits], [h.score for h in w.hits], rtol=1e-5, atol=1e-6)
            for name in ("percentile", "percentile_low", "percentile_high", "cosine"):
                np.testing.assert_allclose([getattr(h, name) for h in r.hits], [getattr(h, name) for h in w.hits],
                                           rtol=1e-6, atol=1e-9)
    assert shared.reused_tokens > 0


def test_a_pass_bounds_the_calibration_rows_once_for_all_its_queries(pruned_index, monkeypatch):
    monkeypatch.setattr(index_mod, "pruning_pays", lambda *a, **k: True)
    idx = pruned_index
    idx.query_top = 4
    f = idx.encode([(s.prompt, s.response) for s in corpus(4, seed=500, prefix="q")])
    queries = [f.select([0, 1]), f.select([2]), f.select([3])]  # a group of two samples, two of one
    probs = [q.probs for q in queries]
    cal, _ = idx.calibration_rows()
    for max_tokens in (1, 10_000):  # one query at a time, all at once
        together = idx.calibration_bounds(queries, probs, block=7, max_tokens=max_tokens)
        for q, p, (lo, hi) in zip(queries, probs, together):
            want = idx.value_bounds(q, cal, p)
            np.testing.assert_allclose(lo, want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(hi, want[1], rtol=1e-5, atol=1e-6)
    # a pass's searches read them instead of bounding the rows each
    def bounded_again(self, *args, **kwargs):
        raise AssertionError("a search of the pass bounded the calibration rows again")

    monkeypatch.setattr(type(idx), "value_bounds", bounded_again)
    shared = idx.row_probs()
    out = idx.run_pass([idx.answer_steps(q, 3, ("most", "least"), 20, shared=shared) for q in queries], shared)
    assert [e for _, e in out] == [None] * 3
    assert all(h.percentile is not None for a, _ in out for _, r in a for h in r.hits)
