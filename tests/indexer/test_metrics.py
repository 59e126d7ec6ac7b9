"""Tests of forvalue.indexer.metrics against brute-force references (and sklearn when installed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forvalue.indexer.metrics import auc, average_ranks, evaluate, recall_at_m


def auc_pairwise(scores, positives) -> float:
    """Reference: mean over (positive, negative) pairs of 1 if the positive scores higher, 1/2 on ties."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positives, dtype=bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (pos.size * neg.size)


def recall_loop(scores, positives) -> float:
    """Reference: pick the highest score m times, lowest index on ties."""
    s = list(map(float, scores))
    y = list(map(bool, positives))
    m = sum(y)
    if m == 0:
        return math.nan
    left = list(range(len(s)))
    hits = 0
    for _ in range(m):
        best = max(left, key=lambda j: (s[j], -j))
        left.remove(best)
        hits += y[best]
    return hits / m


def random_case(seed: int, n: int, ties: bool):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    positives = rng.random(n) < 0.3
    positives[0], positives[-1] = True, False  # both classes present
    return scores, positives


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_pairwise(seed, ties):
    scores, positives = random_case(seed, 37, ties)
    assert auc(scores, positives) == pytest.approx(auc_pairwise(scores, positives), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(seed, ties):
    metrics = pytest.importorskip("sklearn.metrics")
    scores, positives = random_case(seed, 200, ties)
    assert auc(scores, positives) == pytest.approx(metrics.roc_auc_score(positives, scores), abs=1e-12)


def test_auc_hand_made():
    assert auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    # pairs (pos 2 vs neg 1, 2): 1 + 1/2; (pos 0 vs neg 1, 2): 0 + 0  -> 1.5 / 4
    assert auc([2.0, 1.0, 2.0, 0.0], [True, False, False, True]) == 0.375


def test_auc_nan_cases():
    assert math.isnan(auc([1.0, 2.0], [False, False]))
    assert math.isnan(auc([1.0, 2.0], [True, True]))
    assert math.isnan(auc([], []))


def test_auc_input_errors():
    with pytest.raises(ValueError, match="same length"):
        auc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="NaN"):
        auc([1.0, math.nan], [True, False])
    with pytest.raises(ValueError, match="0/1"):
        auc([1.0, 2.0], [2, 0])


def test_average_ranks():
    np.testing.assert_array_equal(average_ranks(np.array([10.0, 20.0, 10.0, 5.0])), [2.5, 4.0, 2.5, 1.0])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_loop(seed, ties):
    scores, positives = random_case(seed, 41, ties)
    assert recall_at_m(scores, positives) == recall_loop(scores, positives)


def test_recall_hand_made_and_ties_by_index():
    assert recall_at_m([5, 4, 3, 2], [1, 1, 0, 0]) == 1.0
    assert recall_at_m([5, 4, 3, 2], [0, 1, 0, 1]) == 0.5
    # all tied: the first m indices win
    assert recall_at_m([1, 1, 1, 1], [1, 1, 0, 0]) == 1.0
    assert recall_at_m([1, 1, 1, 1], [0, 0, 1, 1]) == 0.0
    assert recall_at_m([1, 1], [True, True]) == 1.0
    assert math.isnan(recall_at_m([1.0, 2.0], [0, 0]))


def test_evaluate_perfect_and_reversed():
    val = ["a", "b"]
    train = ["a", "a", "b", "b", "c"]
    S = np.array([[9, 8, 1, 2, 0], [0, 1, 9, 8, 2]], dtype=float)
    out = evaluate(S, val, train)
    assert out == {"auc_mean": 1.0, "auc_std": 0.0, "recall_mean": 1.0, "recall_std": 0.0,
                   "n_valuation": 2, "n_train": 5, "n_rows_scored": 2}
    rev = evaluate(-S, val, train)
    assert rev["auc_mean"] == 0.0 and rev["recall_mean"] == 0.0


def test_evaluate_matches_per_row_reference():
    rng = np.random.default_rng(3)
    n_classes, per_val, per_train = 4, 3, 10
    val = np.repeat(np.arange(n_classes), per_val)
    train = np.repeat(np.arange(n_classes), per_train)
    S = rng.normal(size=(val.size, train.size)) + 0.8 * (val[:, None] == train[None, :])
    out = evaluate(S, list(val), list(train))
    aucs = [auc_pairwise(S[i], train == val[i]) for i in range(val.size)]
    recalls = [recall_loop(S[i], train == val[i]) for i in range(val.size)]
    assert out["auc_mean"] == pytest.approx(np.mean(aucs))
    assert out["auc_std"] == pytest.approx(np.std(aucs))
    assert out["recall_mean"] == pytest.approx(np.mean(recalls))
    assert out["recall_std"] == pytest.approx(np.std(recalls))
    assert out["n_rows_scored"] == val.size


def test_evaluate_skips_undefined_rows():
    # valuation label "z" has no training row: its AUC and recall are NaN and left out of the means
    S = np.array([[3, 2, 1], [1, 2, 3]], dtype=float)
    out = evaluate(S, ["a", "z"], ["a", "b", "b"])
    assert out["auc_mean"] == 1.0 and out["recall_mean"] == 1.0 and out["n_rows_scored"] == 1
    none = evaluate(S[1:], ["z"], ["a", "b", "b"])
    assert math.isnan(none["auc_mean"]) and math.isnan(none["auc_std"]) and none["n_rows_scored"] == 0


def test_evaluate_with_clean_flags():
    train = ["a", "a", "a", "b", "b", "b"]
    clean = [True, True, False, True, True, False]
    # the noisy "a" row (index 2) scores highest for valuation row "a"; positives exclude it
    S = np.array([[5, 4, 9, 1, 1, 1], [1, 1, 1, 5, 4, 0]], dtype=float)
    out = evaluate(S, ["a", "b"], train, train_clean=clean)
    assert out["auc_mean"] == pytest.approx(np.mean([auc_pairwise(S[0], [1, 1, 0, 0, 0, 0]),
                                                     auc_pairwise(S[1], [0, 0, 0, 1, 1, 0])]))
    assert out["recall_mean"] == pytest.approx(np.mean([recall_loop(S[0], [1, 1, 0, 0, 0, 0]), 1.0]))
    v = S.mean(axis=0)  # [3, 2.5, 5, 3, 2.5, 0.5]
    assert out["clean_auc"] == pytest.approx(auc_pairwise(v, clean))
    # ceil(6 / 10) = 1 row: index 2 (mean 5), which is noisy
    assert out["clean_share_top10"] == 0.0
    assert "clean_auc" not in evaluate(S, ["a", "b"], train)


def test_evaluate_top10_uses_integer_ceil():
    # 0.1 * 30 = 3.0000000000000004 in floating point; the top share must still be 3 rows, not 4
    n = 30
    S = np.arange(n, 0, -1, dtype=float)[None, :]
    clean = [True] * 3 + [False] * (n - 3)
    out = evaluate(S, ["a"], ["a"] * n, train_clean=clean)
    assert out["clean_share_top10"] == 1.0


def test_evaluate_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        evaluate(np.zeros(3), ["a"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels"):
        evaluate(np.zeros((2, 3)), ["a"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="train_clean"):
        evaluate(np.zeros((1, 3)), ["a"], ["a", "b", "c"], train_clean=[True])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.full((1, 2), math.nan), ["a"], ["a", "b"])


def test_candidate_recall_and_fidelity():
    from forvalue.indexer.metrics import candidate_recall_topk, fidelity_at_k

    exact = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    approx = np.array([[1.0, 5.0, 4.0, 3.0, 2.0]])  # exact #1 ranked last by the first stage
    assert candidate_recall_topk(exact, approx, 2, 2) == 0.5
    assert fidelity_at_k(exact, approx, 2, 2) == 0.5
    assert candidate_recall_topk(exact, approx, 2, 5) == 1.0
    assert fidelity_at_k(exact, approx, 2, 5) == 1.0
    assert fidelity_at_k(exact, exact, 3, 3) == 1.0


def test_reciprocal_rank_hand_computed():
    from forvalue.indexer.metrics import reciprocal_rank

    # order by score: idx 3 (0.9), 0 (0.8), 2 (0.5), 1 (0.1); gold {2, 1} → first gold at rank 3
    assert reciprocal_rank([0.8, 0.1, 0.5, 0.9], [0, 1, 1, 0]) == pytest.approx(1 / 3)
    assert reciprocal_rank([0.8, 0.1, 0.5, 0.9], [0, 0, 0, 1]) == 1.0
    # a tie goes to the lower index: idx 0 and 1 tie, gold idx 1 ranks second
    assert reciprocal_rank([1.0, 1.0, 0.0], [0, 1, 0]) == 0.5
    assert math.isnan(reciprocal_rank([1.0, 2.0], [0, 0]))


def test_hit_at_k_and_recall_at_m_hand_computed():
    from forvalue.indexer.metrics import hit_at_k, recall_at_m

    s = [0.8, 0.1, 0.5, 0.9, 0.3]
    g = [0, 1, 1, 0, 0]  # ranks: 3, 0, 2, 4, 1 → gold at ranks 3 and 5
    assert hit_at_k(s, g, 2) == 0.0
    assert hit_at_k(s, g, 3) == 1.0
    assert recall_at_m(s, g) == 0.0  # m = 2: top 2 are idx 3 and 0
    assert recall_at_m(s, [1, 1, 1, 0, 0]) == pytest.approx(2 / 3)  # top 3: 3, 0, 2 → gold 0 and 2
    with pytest.raises(ValueError, match="k must be"):
        hit_at_k(s, g, 0)


def test_retrieval_summary_means_over_rows_with_gold():
    from forvalue.indexer.metrics import retrieval_summary

    S = [[0.9, 0.1, 0.5], [0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]
    G = [[0, 0, 1], [0, 1, 1], [0, 0, 0]]
    out = retrieval_summary(S, G, k=1)
    # row 0: gold idx 2 at rank 2 → rr 1/2, hit@1 0, recall@m (m=1) 0; row 1: rr 1, hit 1, top 2 = {1, 2} → 1
    assert out == {"mrr": pytest.approx(0.75), "recall_at_1": 0.5, "recall_at_m": 0.5}
    with pytest.raises(ValueError, match="same shape"):
        retrieval_summary(S, [[0, 1]], k=1)
