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

import torch

from . import metrics
from .data import Sample
from .forward import ForwardConfig, Head, extract_features
from .model import LoadedModel
from .score import ScoreConfig, scores


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
    fv = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in valuation], fwd, head,
                          progress, "valuation")
    ft = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in train], fwd, head,
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
        model=lm.name, tokens=fwd.tokens, method=score.method, **timing,
        seconds=time.perf_counter() - t0, peak_memory_mb=peak_rss_mb(),
    )
    return EvalResult(S, report)
