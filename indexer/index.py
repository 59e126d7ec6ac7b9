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
    hits: list[Hit]
    version: str
    direction: str
    candidates: int


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
        # flat: exact search over the (checksummed) sketch arrays, built on load
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
        d = self.version.token_rows(np.asarray(rows, dtype=np.int64))
        return Features(torch.from_numpy(np.asarray(d["h"], dtype=np.float32)),
                        torch.from_numpy(np.asarray(d["y"], dtype=np.int64)),
                        torch.from_numpy(np.asarray(d["lse"], dtype=np.float32)),
                        torch.from_numpy(np.asarray(d["offsets"], dtype=np.int64)))

    def search(self, samples: Sequence[Sample | tuple[str, str]], k: int = 10, direction: str = "most",
               rerank: int = 100, features: Features | None = None) -> SearchResult:
        """Top-k most (or least) valuable training samples for the group `samples` (scored by the mean of G).

        Args:
            k: answers wanted (clamped to the index size).
            direction: "most" or "least".
            rerank: candidates from the first stage that are scored exactly (>= k).
            features: the queries' features, when already computed (skips the forward pass).
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
        q = self.query_sketches(features).mean(0, keepdim=True)
        _, ids = self.ann.search(q.numpy().astype(np.float32), C, direction)
        cand = ids[0][ids[0] >= 0]
        exact = exact_scores(features, self.candidate_features(cand), self._cpu_head).mean(0)
        order = torch.argsort(exact, descending=(direction == "most"), stable=True)[:k]
        rows = cand[order.numpy()]
        meta = self.version.rows(rows)
        hits = [Hit(id=str(md["id"]), score=float(exact[o]), rank=r + 1, row=int(row), metadata=md)
                for r, (o, row, md) in enumerate(zip(order.tolist(), rows.tolist(), meta))]
        return SearchResult(hits, self.version.name, direction, int(cand.size))

    def query_sketches(self, features: Features) -> torch.Tensor:
        """First-stage sketches of the query rows → (nq, dim)."""
        return self.sketcher.sketch(features, self._cpu_head)

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
