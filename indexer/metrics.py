"""Evaluation metrics of a value matrix against class labels: AUC, recall@m and their summary (pure numpy).

Convention: a higher score means a more valuable training sample (For-Value's raw scores). DataInf's
influence matrices store the negated influence, so pass `-IF` to use them here.

The DataInf / For-Value benchmark protocol (see shared/eval/datainf/SOURCE.md): for each valuation
sample i, the positives are the training samples with the same label; AUC is sklearn's `roc_auc_score`
of the scores against that ground truth, and "recall" is the share of positives among the m highest
scores, m = number of positives (recall@m = precision@m). Both are averaged over valuation samples, with
the population standard deviation (`np.std`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

TOP_DIVISOR = 10  # clean_share_top10 looks at the top ceil(n_train / 10) samples


def _check_pair(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and positives must be 1-D of the same length, got {s.shape} and {y.shape}")
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError("positives must be booleans or 0/1")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; AUC and recall need comparable scores")
    return s, y


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` (n,), ties sharing the mean of their ranks (scipy's `rankdata`, 'average')."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Start of each run of equal values in sorted order; a run [a, b) gets rank (a + 1 + b) / 2.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve of `scores` (n,) for the boolean ground truth `positives` (n,).

    Same value as `sklearn.metrics.roc_auc_score(positives, scores)`, ties included: the Mann-Whitney
    statistic AUC = (sum of the positives' average ranks - P(P+1)/2) / (P N), i.e. the probability that a
    random positive scores above a random negative, ties counting 1/2.

    Returns:
        The AUC in [0, 1], or NaN when there is no positive or no negative.

    Raises:
        ValueError: shapes differ, scores contain NaN, or positives are not boolean / 0-1.
    """
    s, y = _check_pair(scores, positives)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def top_order(scores: np.ndarray) -> np.ndarray:
    """Indices of `scores` (n,) from highest to lowest; equal scores keep index order (lower index first)."""
    # Stable ascending sort of the negated scores keeps tied indices in increasing order.
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def recall_at_m(scores: Any, positives: Any) -> float:
    """Share of positives among the m highest scores, m = number of positives (recall@m = precision@m).

    This is DataInf's and For-Value's "recall" (m = 90 on their benchmarks). Ties are broken by index,
    lower index first, so the result is deterministic.

    Returns:
        A value in [0, 1], or NaN when there is no positive.

    Raises:
        ValueError: shapes differ, scores contain NaN, or positives are not boolean / 0-1.
    """
    s, y = _check_pair(scores, positives)
    m = int(y.sum())
    if m == 0:
        return math.nan
    return float(y[top_order(s)[:m]].sum()) / m


def _mean_std(values: list[float]) -> tuple[float, float]:
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return math.nan, math.nan
    return float(defined.mean()), float(defined.std())


def _label_codes(val_labels: Sequence[Hashable], train_labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    codes: dict[Hashable, int] = {}
    train = np.asarray([codes.setdefault(label, len(codes)) for label in train_labels], dtype=np.int64)
    val = np.asarray([codes.get(label, -1) for label in val_labels], dtype=np.int64)
    return val, train


def evaluate(
    S: Any,
    val_labels: Sequence[Hashable],
    train_labels: Sequence[Hashable],
    train_clean: Sequence[bool] | None = None,
) -> dict[str, float | int]:
    """Score a value matrix against labels with the DataInf / For-Value protocol.

    For valuation row i the positives are the training samples j with train_labels[j] == val_labels[i]
    (and train_clean[j], when given). AUC_i = auc(S[i], positives), recall_i = recall_at_m(S[i], positives).

    Args:
        S: (n_val, n_train) values, higher = more valuable.
        val_labels: (n_val,) labels of the valuation samples.
        train_labels: (n_train,) labels of the training samples.
        train_clean: (n_train,) optional flags, False for a corrupted training sample.

    Returns:
        auc_mean, auc_std: mean and population std of AUC_i over rows where it is defined
            (rows with at least one positive and one negative); NaN if none.
        recall_mean, recall_std: the same for recall_i, over rows with at least one positive.
        n_valuation, n_train: the matrix shape; n_rows_scored: rows with a defined AUC.
        With train_clean also:
        clean_auc: AUC of the clean flags against v = mean_i S[i] (n_train,), i.e. how well the
            average value separates clean from corrupted training samples (NaN if all or none clean).
        clean_share_top10: share of clean samples among the ceil(10% n_train) highest v (ties by index).

    Raises:
        ValueError: shapes do not match, or S contains NaN.
    """
    M = np.asarray(S, dtype=np.float64)
    if M.ndim != 2:
        raise ValueError(f"S must be a 2-D (n_val, n_train) matrix, got shape {M.shape}")
    n_val, n_train = M.shape
    if len(val_labels) != n_val or len(train_labels) != n_train:
        raise ValueError(
            f"S is {M.shape} but there are {len(val_labels)} valuation and {len(train_labels)} training labels"
        )
    if np.isnan(M).any():
        raise ValueError("S contains NaN; check the valuation run")
    val_codes, train_codes = _label_codes(val_labels, train_labels)
    clean = None
    if train_clean is not None:
        clean = np.asarray(train_clean, dtype=bool)
        if clean.shape != (n_train,):
            raise ValueError(f"train_clean must have shape ({n_train},), got {clean.shape}")

    aucs, recalls = [], []
    for i in range(n_val):
        pos = train_codes == val_codes[i]
        if clean is not None:
            pos &= clean
        aucs.append(auc(M[i], pos))
        recalls.append(recall_at_m(M[i], pos))
    auc_mean, auc_std = _mean_std(aucs)
    recall_mean, recall_std = _mean_std(recalls)
    out: dict[str, float | int] = {
        "auc_mean": auc_mean,
        "auc_std": auc_std,
        "recall_mean": recall_mean,
        "recall_std": recall_std,
        "n_valuation": n_val,
        "n_train": n_train,
        "n_rows_scored": sum(not math.isnan(a) for a in aucs),
    }
    if clean is not None:
        v = M.mean(axis=0) if n_val else np.zeros(n_train)
        k = -(-n_train // TOP_DIVISOR)  # integer ceil; 0.1 * n can round up past an integer
        out["clean_auc"] = auc(v, clean)
        out["clean_share_top10"] = float(clean[top_order(v)[:k]].mean()) if k else math.nan
    return out


def _topk_sets(S: np.ndarray, k: int) -> list[set[int]]:
    return [set(top_order(row)[:k].tolist()) for row in S]


def candidate_recall_topk(S_exact: Any, S_approx: Any, k: int, C: int) -> float:
    """Mean over rows of |exact top-k ∩ approximate top-C| / k: how much of the answer a first stage keeps.

    Args:
        S_exact, S_approx: (n_rows, n) scores, higher = better (negate both for least-influential).
    """
    E, A = np.asarray(S_exact, dtype=np.float64), np.asarray(S_approx, dtype=np.float64)
    k = min(k, E.shape[1])
    return float(np.mean([len(e & c) / k for e, c in zip(_topk_sets(E, k), _topk_sets(A, C))]))


def fidelity_at_k(S_exact: Any, S_approx: Any, k: int, C: int) -> float:
    """Mean overlap of the re-ranked top-k (top-C by S_approx, re-ordered by S_exact) with the exact top-k."""
    E, A = np.asarray(S_exact, dtype=np.float64), np.asarray(S_approx, dtype=np.float64)
    k = min(k, E.shape[1])
    out = []
    for e_row, a_row in zip(E, A):
        cand = top_order(a_row)[:C]
        reranked = cand[top_order(e_row[cand])[:k]]
        out.append(len(set(reranked.tolist()) & set(top_order(e_row)[:k].tolist())) / k)
    return float(np.mean(out))


# --------------------------------------------------------------------------------------------------
# Retrieval metrics of one ranking against a set of gold rows (fact tracing). Ties are broken by index,
# lower index first (top_order), so every value is deterministic.


def reciprocal_rank(scores: Any, gold: Any) -> float:
    """1 / (1-based rank of the highest-ranked gold row) in the order of `scores` (n,); NaN with no gold."""
    s, y = _check_pair(scores, gold)
    if not y.any():
        return math.nan
    first = int(np.flatnonzero(y[top_order(s)])[0])
    return 1.0 / (first + 1)


def hit_at_k(scores: Any, gold: Any, k: int) -> float:
    """Recall@k in the "any gold" sense: 1.0 when a gold row is among the k highest scores, else 0.0 (NaN
    with no gold)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s, y = _check_pair(scores, gold)
    if not y.any():
        return math.nan
    return float(y[top_order(s)[:k]].any())


def retrieval_summary(S: Any, gold: Any, k: int = 10) -> dict[str, float]:
    """Mean MRR, recall@k (any gold in the top k) and recall@m (share of the m gold rows in the top m) over
    the rows of S (n_queries, n) against the boolean gold matrix of the same shape; rows with no gold are left
    out of the means (NaN if none has gold)."""
    M, G = np.asarray(S, dtype=np.float64), np.asarray(gold)
    if M.ndim != 2 or G.shape != M.shape:
        raise ValueError(f"S and gold must be 2-D of the same shape, got {M.shape} and {G.shape}")
    rr = [reciprocal_rank(M[i], G[i]) for i in range(M.shape[0])]
    hit = [hit_at_k(M[i], G[i], k) for i in range(M.shape[0])]
    rm = [recall_at_m(M[i], G[i]) for i in range(M.shape[0])]
    return {"mrr": _mean_std(rr)[0], f"recall_at_{k}": _mean_std(hit)[0], "recall_at_m": _mean_std(rm)[0]}
