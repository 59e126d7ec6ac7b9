"""`forvalue eval`: value every training sample for every valuation sample and score the ranking.

Data → features (one forward pass per sample) → For-Value matrix → AUC / Recall (metrics.py). The
pipeline takes loaded samples and a loaded model so that library callers and tests can reuse it; the
CLI does the loading.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import metrics
from .config import ScoreConfig
from .data import Sample
from .features import ForwardConfig, Head
from .forward import extract_features
from .model import LoadedModel
from .score import exact_scores, g_norms, scores, unit_scale


@dataclass(frozen=True)
class EvalResult:
    """The value matrix and the metrics computed from it.

    Attributes:
        S: (n_valuation, n_train) For-Value scores, higher = more valuable.
        report: metrics (auc_mean, recall_mean, ...) plus sizes, settings, seconds and peak memory.
    """

    S: torch.Tensor
    report: dict


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def value_matrix(lm: LoadedModel, valuation: Sequence[Sample], train: Sequence[Sample],
                 fwd: ForwardConfig, score: ScoreConfig, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """For-Value of every training sample to every valuation sample → ((nv, nt), timings in seconds)."""
    device = next(lm.model.parameters()).device
    head = Head.from_model(lm.model, fwd.dtype).to(device)
    t0 = time.perf_counter()
    fv = extract_features(lm.model, lm.preprocessor, [s.as_input() for s in valuation], fwd, head,
                          progress, "valuation")
    ft = extract_features(lm.model, lm.preprocessor, [s.as_input() for s in train], fwd, head,
                          progress, "training")
    t1 = time.perf_counter()
    S = scores(fv, ft, head.to("cpu"), score)
    t2 = time.perf_counter()
    return S, {"forward_seconds": t1 - t0, "score_seconds": t2 - t1,
               "scored_tokens": int(fv.h.shape[0] + ft.h.shape[0]), "truncated": fv.truncated + ft.truncated}


def run_eval(lm: LoadedModel, valuation: Sequence[Sample], train: Sequence[Sample],
             fwd: ForwardConfig = ForwardConfig(), score: ScoreConfig = ScoreConfig(),
             progress: bool = False) -> EvalResult:
    """Values `train` for `valuation` and reports AUC / Recall (and clean_auc when `clean` is present)."""
    t0 = time.perf_counter()
    S, timing = value_matrix(lm, valuation, train, fwd, score, progress)
    clean = None
    if any(s.clean is not None for s in train):
        clean = [s.clean is not False for s in train]
    report = metrics.evaluate(S.double().numpy(), [s.label for s in valuation], [s.label for s in train], clean)
    report.update(
        model=lm.name, tokens=fwd.tokens, method=score.method, normalize=score.normalize, **timing,
        seconds=time.perf_counter() - t0, peak_memory_mb=peak_rss_mb(),
    )
    return EvalResult(S, report)


def index_ranking(approx: torch.Tensor, exact: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """The full ranking an index gives one query, as scores (higher = ranked earlier) → (n,).

    `top` are the first stage's most-influential candidates, `bottom` its least-influential ones. The
    top candidates come first, ordered by their exact score (the re-ranked "most" answer); the bottom
    ones come last, ordered by exact score (the re-ranked "least" answer); the other rows keep the
    sketch's order in between.
    """
    n = approx.numel()
    in_top = torch.zeros(n, dtype=torch.bool)
    in_top[top] = True
    bottom = bottom[~in_top[bottom]]
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    rest[bottom] = False
    middle = rest.nonzero().squeeze(1)
    order = torch.cat([
        top[torch.argsort(exact[top], descending=True, stable=True)],
        middle[torch.argsort(approx[middle], descending=True, stable=True)],
        bottom[torch.argsort(exact[bottom], descending=True, stable=True)],
    ])
    out = torch.empty(n, dtype=torch.float64)
    out[order] = torch.arange(n, 0, -1, dtype=torch.float64)
    return out


def _row_input(row: dict) -> tuple:
    """A stored index row as forward-pass input; its image (a VLM index) is read again from its path."""
    if not row.get("image"):
        return (row["prompt"], row["response"])
    from .images import ImageRef

    return (row["prompt"], row["response"], ImageRef(path=row["image"], source=f"index row {row['id']!r}"))


def _overlap(answer: torch.Tensor, truth: torch.Tensor) -> float:
    return len(set(answer.tolist()) & set(truth.tolist())) / max(truth.numel(), 1)


def _first_stage_fidelity(index, q: torch.Tensor, approx: torch.Tensor, through: torch.Tensor, exact: torch.Tensor,
                          rerank: int, k: int) -> tuple[list, list, list, list, list]:
    """The first stage as served (FAISS over the query sketches q, most and least) against the exact reference,
    per query: (rankings as `index_ranking` makes them, top-k fidelity most, least, candidate recall most, least)."""
    q = q.float().numpy()
    C = min(rerank, index.n)
    _, top_ids = index.ann.search(q, C, "most")
    _, bottom_ids = index.ann.search(q, C, "least")
    ranked, fid_most, fid_least, cand_most, cand_least = [], [], [], [], []
    for i in range(q.shape[0]):
        top, bottom = torch.from_numpy(top_ids[i]), torch.from_numpy(bottom_ids[i])
        ranked.append(index_ranking(approx[i], through[i], top, bottom))
        true_most = torch.argsort(exact[i], descending=True, stable=True)[:k]
        true_least = torch.argsort(exact[i], descending=False, stable=True)[:k]
        ans_most = top[torch.argsort(through[i][top], descending=True, stable=True)[:k]]
        ans_least = bottom[torch.argsort(through[i][bottom], descending=False, stable=True)[:k]]
        fid_most.append(_overlap(ans_most, true_most))
        fid_least.append(_overlap(ans_least, true_least))
        cand_most.append(_overlap(top, true_most))
        cand_least.append(_overlap(bottom, true_least))
    return ranked, fid_most, fid_least, cand_most, cand_least


def run_index_eval(index, valuation: Sequence[Sample], rerank: int = 100, k: int = 10,
                   progress: bool = False) -> dict:
    """Evaluates through an index, next to exact For-Value recomputed from scratch on the same rows.

    The training set is the index's rows; their texts, labels (and clean flags) come from the stored
    metadata. The exact reference runs a fresh forward pass over those texts, independent of the index.

    Returns:
        auc_mean/recall_mean: AUC and Recall of the index's ScoreAll values (exact For-Value from the
            stored re-rank data); exact_auc_mean/exact_recall_mean: of the fresh exact reference;
            max_abs_score_diff: largest |ScoreAll − reference| over all pairs.
        fidelity_top10_{most,least}: overlap of the index's top-k answer (first stage top-`rerank`,
            re-ranked exactly) with the reference's top-k over the whole training set;
            candidate_recall_{most,least}: share of the reference's top-k in the first stage's top-`rerank`.
        topk_auc_mean/topk_recall_mean: of the ranking made of the re-ranked most answer, the first
            stage's order, then the re-ranked least answer (a stress test of the first stage alone);
            sketch_auc_mean/sketch_recall_mean: of the first-stage scores alone.
        Plus sizes, timings and peak memory.
    """
    t0 = time.perf_counter()
    rows = index.version.rows(range(index.n))
    train_labels = [r.get("label") for r in rows]
    if any(lab is None for lab in train_labels):
        from .errors import DataError

        missing = next(r["id"] for r in rows if r.get("label") is None)
        raise DataError(f"training sample {missing!r} of index {index.version.path} has no label; build the index "
                        "from labelled data to evaluate through it")
    clean = [r.get("clean") is not False for r in rows] if any("clean" in r for r in rows) else None
    fv = extract_features(index.lm.model, index.lm.preprocessor, [s.as_input() for s in valuation],
                          index.forward, index.head, progress, "valuation")
    t1 = time.perf_counter()
    q = index.query_sketches(fv)
    approx = index.sketch_scores(q).double()
    through = index.score_matrix(fv).double()
    t2 = time.perf_counter()
    ft = extract_features(index.lm.model, index.lm.preprocessor, [_row_input(r) for r in rows],
                          index.forward, index.head, progress, "reference")
    exact = exact_scores(fv, ft, index._cpu_head).double()
    if index.row_scale is not None:  # a unit-normalised index: the reference divides by ‖G‖ of the recomputed rows
        exact = exact * unit_scale(g_norms(ft, index._cpu_head).double())[None, :]
    t3 = time.perf_counter()
    k = min(k, index.n)
    ranked, fid_most, fid_least, cand_most, cand_least = _first_stage_fidelity(index, q, approx, through, exact,
                                                                               rerank, k)
    val_labels = [s.label for s in valuation]
    m_through = metrics.evaluate(through.numpy(), val_labels, train_labels, clean)
    m_exact = metrics.evaluate(exact.numpy(), val_labels, train_labels, clean)
    m_topk = metrics.evaluate(torch.stack(ranked).numpy(), val_labels, train_labels, clean)
    m_sketch = metrics.evaluate(approx.numpy(), val_labels, train_labels, clean)
    report = {
        "auc_mean": m_through["auc_mean"], "auc_std": m_through["auc_std"],
        "recall_mean": m_through["recall_mean"], "recall_std": m_through["recall_std"],
        "exact_auc_mean": m_exact["auc_mean"], "exact_recall_mean": m_exact["recall_mean"],
        "max_abs_score_diff": float((through - exact).abs().max()),
        "fidelity_top10_most": float(np.mean(fid_most)), "fidelity_top10_least": float(np.mean(fid_least)),
        "candidate_recall_most": float(np.mean(cand_most)), "candidate_recall_least": float(np.mean(cand_least)),
        "topk_auc_mean": m_topk["auc_mean"], "topk_recall_mean": m_topk["recall_mean"],
        "sketch_auc_mean": m_sketch["auc_mean"], "sketch_recall_mean": m_sketch["recall_mean"],
        "rerank": rerank, "k": k, "n_valuation": fv.n, "n_train": index.n,
        "index_version": index.version.name, "tokens": index.forward.tokens, "model": index.lm.name,
        "sketch_dim": index.manifest["sketch"]["dim"],
        "forward_seconds": t1 - t0, "score_seconds": t2 - t1, "reference_seconds": t3 - t2,
        "seconds": time.perf_counter() - t0, "peak_memory_mb": peak_rss_mb(),
    }
    if clean is not None:
        report.update(clean_auc=m_through["clean_auc"], clean_share_top10=m_through["clean_share_top10"])
    return report
