"""Exact re-ranking that scores exactly only the candidates that can still be in the answer.

Exact For-Value of a candidate needs its tokens' full next-token distributions, |V|·d work per token:
re-ranking C candidates that way costs C·T·|V|·d, several times the query's own forward pass. But the
answer only needs the exact scores of its k members, and which candidates those are can be decided from
bounds. With S(v, i) = Σ_kk' <h_k, h_k'> · α_kk' and

    α_kk' = δ(y_k, y_k') − π_k'(y_k) − π_k(y_k') + <π_k, π_k'>,

every term but the last is cheap from what the index stores (hidden states, targets, log-partitions).
For the last, the index also stores each training token's top-m probabilities S_k' and the l2 norm of the
rest of its distribution; the query contributes its own top-q tokens Q_k. Over K = Q_k ∪ S_k' the sum is
computed from exact probabilities; outside K, by Cauchy–Schwarz,

    0 ≤ Σ_{t∉K} π_k(t) π_k'(t) ≤ ‖π_k outside Q_k‖₂ · ‖π_k' outside S_k'‖₂,

so each candidate's score lies in a certified interval [lo, hi] (widened by a float-rounding slack).
A candidate whose interval cannot reach the k-th best lower bound (upper bound, for the least valuable)
cannot be in the answer; the rest (typically k and a few) are scored exactly by `score.exact_scores`. The
answer (ids, order, scores) is the one exact re-ranking of all C candidates gives — tested against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .features import Features, Head
from .score import sample_blocks, segment_sum_rows

# relative float-rounding slack between this computation and exact_scores', per |<h, h'>| (|α| ≤ 3)
SLACK = 1e-4
# the most memory a query's (or a batch of queries') whole next-token distributions may take
QUERY_PROBS_BYTES = 512 * 2**20
# the most memory the training rows' distributions shared by the queries of one batcher pass may take
PASS_PROBS_BYTES = 1024 * 2**20


class RowProbs:
    """The whole next-token distributions of training rows' tokens, computed once and shared by every exact
    score that needs them while this object lives.

    An exact score needs each scored row's π over the whole vocabulary, |V|·d work per token: as much as the
    query's forward pass for a top-10 answer. The queries of one batcher pass (server/batching.py) often share
    candidates (queries of one task, rows valuable to many queries), so the pass keeps one RowProbs and each
    row's distributions are computed once per pass instead of once per query and row (`attach`). The values
    are those `Head.probs` gives the row alone (the head is applied token by token).

    Holds at most `memory_bytes` (|V| floats per token); rows past it are computed for the caller and not kept,
    and a call whose rows' distributions would take more than `call_bytes` gets none (the exact scoring then
    computes them by vocabulary chunks, as without this object). A batch also keeps here the bounds of the
    calibration rows it computed for all its queries at once (`calibration`, `Index.run_pass`).

    Attributes:
        computed_tokens: tokens whose distributions were computed. reused_tokens: tokens of rows asked for again
            (`attach`) after a first time, by another search or a later step, and served from memory.
    """

    def __init__(self, head: Head, memory_bytes: int = PASS_PROBS_BYTES, call_bytes: int = QUERY_PROBS_BYTES):
        self.head = head
        self.memory_bytes = memory_bytes
        self.call_bytes = call_bytes
        self._rows: dict[int, torch.Tensor] = {}
        # (query group's Features, lo, hi): bounds of the calibration rows for the query groups of a batch, by id of
        # their Features (held, so the id stays theirs): what `Index.run_pass` bounded for all of them at once
        self.calibration: dict[int, tuple[Features, np.ndarray, np.ndarray]] = {}
        self._held = 0
        self.computed_tokens = 0
        self.reused_tokens = 0
        self._asked: set[int] = set()  # rows `attach` was asked for

    def prefill(self, needs: Sequence[tuple[Features, Sequence[int] | np.ndarray]]) -> None:
        """Compute and keep the distributions of every row of `needs` ((features of rows, those rows) pairs: the
        rows the searches of a batch are about to score exactly, `Index.run_pass`) not known yet, in products of
        at most `call_bytes` (as far as the memory allows; `attach` computes the rest when asked)."""
        seen: set[int] = set()
        parts: list[Features] = []
        rows: list[int] = []
        for ft, rs in needs:
            pick = []
            for j, r in enumerate(np.asarray(rs, dtype=np.int64).tolist()):
                if r not in self._rows and r not in seen:
                    seen.add(r)
                    pick.append(j)
                    rows.append(r)
            if pick:
                parts.append(ft.select(pick))
        if not rows:
            return
        f = Features.concat(parts)
        lengths, off = f.lengths.tolist(), f.offsets.tolist()
        for a, b in sample_blocks(f, max(1, self.call_bytes // max(1, self._bytes(1)))):
            tokens = off[b] - off[a]
            if self._held + self._bytes(tokens) > self.memory_bytes:
                return  # full: later rows are computed by `attach` when asked
            if self._bytes(tokens) <= self.call_bytes:  # (one row alone may be longer)
                self._attach(f.select(range(a, b)), rows[a:b], lengths[a:b])

    def _bytes(self, tokens: int) -> int:
        return tokens * self.head.vocab_size * self.head.weight.element_size()

    def attach(self, ft: Features, rows: Sequence[int] | np.ndarray) -> Features:
        """`ft` (the features of training rows `rows`, in that order) with `probs`: each token's distribution
        over the whole vocabulary (T, V), from memory for rows seen before, computed in one pass over the head
        for the others; `ft` unchanged when they would take more than `call_bytes`."""
        rows = np.asarray(rows, dtype=np.int64).tolist()
        if len(rows) != ft.n:
            raise ValueError(f"RowProbs.attach: {ft.n} samples of features but {len(rows)} rows")
        if ft.probs is not None or not rows or self._bytes(ft.h.shape[0]) > self.call_bytes:
            return ft
        lengths = ft.lengths.tolist()
        for j, r in enumerate(rows):
            if r in self._asked and r in self._rows:
                self.reused_tokens += lengths[j]
            self._asked.add(r)
        return self._attach(ft, rows, lengths)

    def _attach(self, ft: Features, rows: list[int], lengths: list[int]) -> Features:
        """`attach` without counting what was asked for (`prefill` computes ahead of the asks)."""
        missing = [j for j, r in enumerate(rows) if r not in self._rows]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            tok, _ = ft.token_index(missing)
            p = self.head.probs(ft.h[tok], ft.lse[tok])
            self.computed_tokens += p.shape[0]
            for j, part in zip(missing, torch.split(p, [lengths[j] for j in missing])):
                fresh[rows[j]] = part
                size = self._bytes(part.shape[0])
                if self._held + size <= self.memory_bytes and rows[j] not in self._rows:
                    self._rows[rows[j]] = part
                    self._held += size
        if len(missing) == len(rows):  # nothing known before: the one pass is the answer, in order
            return replace(ft, probs=p)
        return replace(ft, probs=torch.cat([fresh[r] if r in fresh else self._rows[r] for r in rows]))


@dataclass
class Candidates:
    """Stored re-rank data of candidate rows: their features and their tokens' top probabilities.

    Attributes:
        feats: per-token h, y, lse and offsets. top_ids: (T, m) int64. top_p: (T, m). tail_l2: (T,).
    """

    feats: Features
    top_ids: torch.Tensor
    top_p: torch.Tensor
    tail_l2: torch.Tensor


def score_bounds(fv: Features, cand: Candidates, head: Head, query_top: int = 32, token_block: int = 2048,
                 probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified lower and upper bounds of S(v, i) for every query sample v and candidate i → (nv, nc) each.

    Args:
        query_top: q, the query tokens' top probabilities computed exactly against every candidate token.
        token_block: candidate tokens per step (bounds the (Tv, block, m) gather).
        probs: the query tokens' distributions (Tv, V), when already computed.
    """
    ft = cand.feats
    P = head.probs(fv.h, fv.lse) if probs is None else probs       # (Tv, V) the query's distributions
    q = min(query_top, head.vocab_size)
    qv, qi = P.topk(q, dim=1)
    P_out = P.scatter(1, qi, 0.0)                                  # π_k outside Q_k
    nv = P_out.square().sum(1).sqrt()                              # (Tv,)
    U, inv = torch.unique(qi, return_inverse=True)
    MQ = torch.zeros(P.shape[0], U.numel(), dtype=P.dtype).scatter_(1, inv, qv)
    Tv, Tt = fv.h.shape[0], ft.h.shape[0]
    base = torch.empty(Tv, Tt, dtype=P.dtype)
    up = torch.empty(Tv, Tt, dtype=P.dtype)
    down = torch.empty(Tv, Tt, dtype=P.dtype)
    m = max(1, cand.top_ids.shape[1])
    token_block = max(1, min(token_block, 2**24 // max(1, Tv * m)))
    for a in range(0, Tt, token_block):
        b = min(a + token_block, Tt)
        h, lse = ft.h[a:b], ft.lse[a:b]
        # <π_k, π_k'> over Q_k: the candidate's exact probabilities at the query's top ids
        pp = MQ @ torch.exp(head.logits(h, U) - lse[:, None]).T
        # ... and over S_k' \ Q_k: the stored probabilities, against π_k outside Q_k
        ids, p = cand.top_ids[a:b], cand.top_p[a:b]
        pp += (P_out[:, ids.reshape(-1)].view(Tv, b - a, -1) * p[None]).sum(-1)
        alpha = (fv.y[:, None] == ft.y[None, a:b]).to(P.dtype)
        alpha -= torch.exp(head.logits(h, fv.y) - lse[:, None]).T    # π_k'(y_k)
        alpha -= P[:, ft.y[a:b]]                                     # π_k(y_k')
        alpha += pp
        g = fv.h @ h.T
        B = nv[:, None] * cand.tail_l2[None, a:b]
        base[:, a:b] = g * alpha - SLACK * g.abs()
        up[:, a:b] = g.clamp(min=0) * B + 2 * SLACK * g.abs()
        down[:, a:b] = g.clamp(max=0) * B

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        z = segment_sum_rows(x, fv.segment, fv.n)                   # (nv, Tt)
        return segment_sum_rows(z.T, ft.segment, ft.n).T             # (nv, nc)

    lo = per_sample(base + down)
    hi = lo + per_sample(up - down)
    return lo, hi


def must_score(lo: torch.Tensor, hi: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """Candidates that can be among the top k (bounds of the group score, (nc,) each) → (nc,) bool.

    most: every candidate whose upper bound reaches the k-th largest lower bound; least: every candidate
    whose lower bound is at most the k-th smallest upper bound. The others are beaten by k candidates
    whatever their exact scores.
    """
    n = lo.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if direction == "most":
        kth = torch.topk(lo, k).values[-1]
        return hi >= kth
    kth = torch.topk(hi, k, largest=False).values[-1]
    return lo <= kth


def query_probs_fit(fv: Features, head: Head, memory_bytes: int = QUERY_PROBS_BYTES) -> bool:
    """Whether the query tokens' full distributions (Tv · |V| floats) fit in `memory_bytes`."""
    return fv.h.shape[0] * head.vocab_size * fv.h.element_size() <= memory_bytes


def pruning_pays(fv: Features, n_candidate_tokens: int, head: Head, query_top: int,
                 memory_bytes: int = QUERY_PROBS_BYTES) -> bool:
    """Whether bounding first is cheaper than scoring every candidate exactly, and fits in memory.

    Bounds cost about Tv·|V|·d (the query's distributions, once) + Tt·(Tv·q + Tv)·d; exact scoring of
    all candidates costs Tt·|V|·d. The query's distributions take Tv·|V| floats.
    """
    tv = fv.h.shape[0]
    if not query_probs_fit(fv, head, memory_bytes):
        return False
    bound_cost = tv * head.vocab_size + n_candidate_tokens * tv * (min(query_top, head.vocab_size) + 1)
    return bound_cost < 0.5 * n_candidate_tokens * head.vocab_size
