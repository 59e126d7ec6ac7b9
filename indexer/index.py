"""Querying a published index: one forward pass for the queries, FAISS first stage, exact re-ranking.

`Index.search` returns exact For-Value scores: the sketch only chooses which `rerank` candidates are
scored exactly (from the stored per-token hidden states, targets and log-partitions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .build import MAP_FILES, load_maps
from .data import Sample
from .errors import ConfigError, IndexCorruptError, IndexMismatchError
from .forward import Features, ForwardConfig, Head, extract_features
from .model import LoadedModel
from .rerank import Candidates, must_score, pruning_pays, query_probs_fit, score_bounds
from .score import exact_scores
from .store import IndexRoot, Version

DIRECTIONS = ("most", "least")


@dataclass(frozen=True)
class Hit:
    """One training sample in an answer.

    Attributes:
        id: the training sample's id. score: exact For-Value to the query (group mean).
        rank: 1-based rank in this answer. row: row number in the index version. metadata: stored row.
    """

    id: str
    score: float
    rank: int
    row: int
    metadata: dict


@dataclass(frozen=True)
class SearchResult:
    """One answer.

    Attributes:
        hits: best first. version: the index version that answered. direction: "most" or "least".
        candidates: first-stage candidates considered. exact_scored: how many of them were scored exactly
            (the others were ruled out by certified bounds, see rerank.py); None when not reported.
    """

    hits: list[Hit]
    version: str
    direction: str
    candidates: int
    exact_scored: int | None = None


def _pairs(samples: Sequence[Sample | tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for s in samples:
        out.append((s.prompt, s.response) if isinstance(s, Sample) else (str(s[0]), str(s[1])))
    return out


class Index:
    """A loaded index version plus the model that encodes queries for it."""

    def __init__(self, version: Version, lm: LoadedModel):
        from .ann import SketchIndex

        m = version.manifest
        if m["model"]["fingerprint"] != lm.fingerprint or m["model"]["tokenizer_fingerprint"] != lm.tokenizer_fingerprint:
            raise IndexMismatchError(
                f"index {version.path} was built with model {m['model']['name']!r} "
                f"(fingerprint {m['model']['fingerprint'][:12]}), not {lm.name!r} ({lm.fingerprint[:12]}); "
                "pass the model the index was built with (--model)"
            )
        self.version = version
        self.lm = lm
        self.manifest = m
        self.forward = ForwardConfig(tokens=m["tokens"], max_length=m["max_length"])
        device = next(lm.model.parameters()).device
        self.head = Head.from_model(lm.model).to(device)
        self._cpu_head = self.head.to("cpu")
        maps = {n: version.global_array(n) for n in MAP_FILES}
        self.sketcher = load_maps(maps, m["sketch"]["buckets"])
        self.n = int(m["n_samples"])
        self.rerank_top = int(m.get("rerank_top", 0))  # 0: an index without top probabilities (no pruning)
        self.query_top = 32
        # flat: exact search over the (checksummed) sketch arrays, built on load
        version.open_all()  # every file open now: serving goes on if gc deletes the version's directory
        self.ann = SketchIndex.build(version.shard_arrays("sketch"), int(m["sketch"]["dim"]), kind=m["index"]["kind"])
        if self.ann.ntotal != self.n:
            raise IndexCorruptError(f"index {version.path}: the first stage holds {self.ann.ntotal} vectors but the "
                                    f"manifest counts {self.n} samples; rebuild the index")

    @classmethod
    def open(cls, root: str, lm: LoadedModel, version: str | None = None, verify: bool = True) -> Index:
        return cls(IndexRoot(root).load(version, verify=verify), lm)

    def encode(self, samples: Sequence[Sample | tuple[str, str]]) -> Features:
        """Features of valuation samples (one forward pass)."""
        return extract_features(self.lm.model, self.lm.tokenizer, _pairs(samples), self.forward, self.head)

    def candidate_features(self, rows: Sequence[int]) -> Features:
        """Stored re-rank features of training rows `rows`, in that order."""
        return self._features(self.version.token_rows(np.asarray(rows, dtype=np.int64), ["h", "y", "lse"]))

    @staticmethod
    def _features(d: dict[str, np.ndarray]) -> Features:
        return Features(torch.from_numpy(np.asarray(d["h"], dtype=np.float32)),
                        torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
                        torch.from_numpy(np.asarray(d["lse"], dtype=np.float32)),
                        torch.from_numpy(np.asarray(d["offsets"], dtype=np.int64)))

    def candidates(self, rows: Sequence[int]) -> Candidates:
        """Stored re-rank features and top probabilities of training rows `rows` (needs rerank_top > 0)."""
        d = self.version.token_rows(np.asarray(rows, dtype=np.int64), ["h", "y", "lse", "top_ids", "top_p", "tail_l2"])
        return Candidates(self._features(d), torch.from_numpy(np.asarray(d["top_ids"], dtype=np.int64)),
                          torch.from_numpy(np.asarray(d["top_p"], dtype=np.float32)),
                          torch.from_numpy(np.asarray(d["tail_l2"], dtype=np.float32)))

    def rerank(self, features: Features, cand: np.ndarray, k: int, direction: str, prune: bool = True,
               probs: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor, int]:
        """The exact top-k of candidate rows `cand` → (rows best first, their exact scores, rows scored exactly).

        With `prune` (and top probabilities in the index), certified bounds rule out the candidates that
        cannot be in the answer first (rerank.py); the answer is the same as scoring all of them.

        Args:
            probs: the query tokens' distributions over the whole vocabulary (Tv, V), when computed already.
        """
        keep = None
        if prune and self.rerank_top and k < cand.size:
            c = self.candidates(cand)
            if pruning_pays(features, c.feats.h.shape[0], self._cpu_head, self.query_top):
                lo, hi = score_bounds(features, c, self._cpu_head, self.query_top, probs=probs)
                keep = torch.nonzero(must_score(lo.mean(0), hi.mean(0), k, direction)).flatten()
                ft = c.feats.select(keep)
            else:
                ft = c.feats
        else:
            ft = self.candidate_features(cand)
        exact = exact_scores(features, ft, self._cpu_head, pv=probs).mean(0)
        order = torch.argsort(exact, descending=(direction == "most"), stable=True)[:k]
        pos = order if keep is None else keep[order]
        return cand[pos.numpy()], exact[order], int(exact.numel())

    def search(self, samples: Sequence[Sample | tuple[str, str]], k: int = 10, direction: str = "most",
               rerank: int = 100, features: Features | None = None, prune: bool = True) -> SearchResult:
        """Top-k most (or least) valuable training samples for the group `samples` (scored by the mean of G).

        Args:
            k: answers wanted (clamped to the index size).
            direction: "most" or "least".
            rerank: candidates from the first stage that are scored exactly (>= k).
            features: the queries' features, when already computed (skips the forward pass).
            prune: rule out candidates by certified bounds before exact scoring (same answer, less work).
        """
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if rerank < 0:
            raise ConfigError(f"rerank must be >= 0, got {rerank}")
        if features is None:
            if not samples:
                raise ConfigError("search needs at least one valuation sample")
            features = self.encode(samples)
        k = min(k, self.n)
        C = min(max(rerank, k), self.n)
        # the query tokens' distributions, computed once for the sketch, the bounds and the exact scores
        probs = self._cpu_head.probs(features.h, features.lse) if query_probs_fit(features, self._cpu_head) else None
        q = self.query_sketches(features, probs).mean(0, keepdim=True)
        _, ids = self.ann.search(q.numpy().astype(np.float32), C, direction)
        cand = ids[0][ids[0] >= 0]
        rows, scores, scored = self.rerank(features, cand, k, direction, prune, probs)
        meta = self.version.rows(rows)
        hits = [Hit(id=str(md["id"]), score=float(s), rank=r + 1, row=int(row), metadata=md)
                for r, (s, row, md) in enumerate(zip(scores.tolist(), rows.tolist(), meta))]
        return SearchResult(hits, self.version.name, direction, int(cand.size), scored)

    def query_sketches(self, features: Features, probs: torch.Tensor | None = None) -> torch.Tensor:
        """First-stage sketches of the query rows → (nq, dim) (`probs`: their tokens' distributions, if known)."""
        return self.sketcher.sketch(features, self._cpu_head, probs=probs)

    def sketch_scores(self, sketches: torch.Tensor) -> torch.Tensor:
        """First-stage scores of every training row for each query sketch (nq, dim) → (nq, n)."""
        return torch.from_numpy(self.ann.all_scores(sketches.float().numpy()))

    def score_all(self, features: Features, block: int = 512) -> torch.Tensor:
        """Exact For-Value of every training row for each query row → (nq, n), streaming over the store."""
        out = torch.empty(features.n, self.n)
        for a in range(0, self.n, block):
            rows = np.arange(a, min(a + block, self.n))
            out[:, a : a + rows.size] = exact_scores(features, self.candidate_features(rows), self._cpu_head)
        return out
