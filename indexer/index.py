"""Querying a published index: one forward pass for the queries, FAISS first stage, exact re-ranking.

`Index.search` returns exact For-Value scores: the sketch only chooses which `rerank` candidates are
scored exactly (from the stored per-token hidden states, targets and log-partitions; on an index of the
"recompute" storage tier, from a new forward pass of the candidates' stored texts: `candidate_features`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np
import torch

from .calibration import count_lower, percentiles_of, undecided
from .certify import certified_ranks, interval_order, to_tighten
from .config import CALIBRATION_ROWS, CPU_QUERY_BATCH_TOKENS, RECOMPUTE
from .data import Sample, sample_of_row
from .deletion import deleted_of
from .errors import ConfigError, IndexCorruptError, IndexMismatchError
from .explain import explain_rows, token_labeler
from .features import Features, ForwardConfig, Head
from .filters import FieldIndex, Where, check_field
from .forward import extract_features
from .model import LoadedModel
from .rerank import (
    QUERY_PROBS_BYTES, SLACK, Candidates, RowProbs, must_score, pruning_pays, query_probs_fit, score_bounds,
)
from .results import (
    DEFAULT_EXACT_BUDGET, DEFAULT_K, DEFAULT_RERANK, DEFAULT_SCORE_BATCH, DIRECTIONS, GROUP, Explanation, Group,
    GroupedResult, Hit, Scores, SearchResult, check_direction, check_scores, cut_texts, index_info, scale_explanation,
)
from .score import exact_scores, g_norms, group_norm, mean_self_score, sample_blocks, segment_sum_rows, unit_scale
from .sketch import MAP_FILES, Sketcher
from .store import IndexRoot, Version



def _pairs(samples: Sequence[Sample | tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for s in samples:
        if isinstance(s, Sample):
            out.append(s.as_input())
        else:  # (prompt, response) or (prompt, response, image) for a VLM index
            out.append((str(s[0]), str(s[1])) + ((s[2],) if len(s) > 2 and s[2] is not None else ()))
    return out


@dataclasses.dataclass
class Known:
    """What a search knows of some rows' values already: certified bounds lo <= S <= hi, (r,) float64 each,
    lo = hi = S where it scored them exactly."""

    rows: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def _positions(sorted_rows: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each of `rows` in `sorted_rows`, whether it is there at all)."""
    rows = np.asarray(rows, dtype=np.int64)
    at = np.searchsorted(sorted_rows, rows)
    return at, (at < sorted_rows.size) & (sorted_rows[np.minimum(at, sorted_rows.size - 1)] == rows)


@dataclasses.dataclass
class Certified:
    """A certified top-k (`Index.certify`): rows best first (k,), their certified bounds lo, hi (k,) float64,
    whether each one's rank is certified (k,) bool, whether the set is (`whole`), candidates scored exactly."""

    rows: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ranks: np.ndarray
    whole: bool
    scored: int


Check = Callable[[], None]  # raises to stop a piece of work between its steps (a deadline, a cancelled call)


@dataclasses.dataclass
class Need:
    """What a search of a batch is about to compute, which `Index.run_pass` computes for all its searches at once:
    the distributions of training rows `rows` (their features `ft`) for their exact scores, and, when `query` is
    set, the bounds of the calibration rows for that query group (its percentiles; `probs`: its tokens'
    distributions)."""

    ft: Features
    rows: np.ndarray
    query: Features | None = None
    probs: torch.Tensor | None = None


# a search as steps: yields a Need before its first exact scores (when it shares a RowProbs); returns its answer
Steps = Generator[Need, None, Any]


def drive(steps: Steps) -> Any:
    """Runs `steps` to their end alone → what they return."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _check(check: Check | None) -> None:
    if check is not None:
        check()


class Index:
    """A loaded index version plus the model that encodes queries for it."""

    def __init__(self, version: Version, lm: LoadedModel):
        from .firststage import open_first_stage

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
        device = next(lm.model.parameters()).device
        # a query batch keeps its tokens' distributions (what a search needs) when they fit as search's would; on
        # a CPU it runs as passes of about CPU_QUERY_BATCH_TOKENS padded tokens
        self.forward = ForwardConfig(tokens=m["tokens"], max_length=m["max_length"], probs_bytes=QUERY_PROBS_BYTES,
                                     **({"batch_tokens": CPU_QUERY_BATCH_TOKENS} if device.type == "cpu" else {}))
        self.head = Head.from_model(lm.model).to(device)
        self._cpu_head = self.head.to("cpu")
        maps = {n: version.global_array(n) for n in MAP_FILES}
        self.sketcher = Sketcher.from_arrays(maps, m["sketch"]["buckets"])
        self.n = int(m["n_samples"])
        self.deleted = deleted_of(version)  # rows never returned (index delete)
        self.fields = FieldIndex(version.rows, self.n)  # metadata value codes, read per field on first use
        # ‖G‖ of every row (calibrated cosine); None for indexes built before it was stored
        self.g_norm = (torch.from_numpy(np.asarray(version.array("g_norm"), dtype=np.float32))
                       if "g_norm" in version.arrays else None)
        # a factor per row on every value the index reports: 1 / ‖G_row‖ in a unit-normalised index
        # (BuildConfig.normalize), whose stored sketches are those of G / ‖G‖ already; None: For-Value as it is
        self.normalize = m.get("normalize", "none")
        self.row_scale = None
        if self.normalize == "unit":
            if self.g_norm is None:
                raise IndexCorruptError(f"index {version.path} is unit-normalised but stores no g_norm; rebuild it")
            self.row_scale = unit_scale(self.g_norm.double())
        self.rerank_top = int(m.get("rerank_top", 0))  # 0: an index without top probabilities (no pruning)
        # the "recompute" storage tier: no hidden states stored; candidates are encoded again at query time
        self.recompute = m.get("rerank_dtype") == RECOMPUTE
        if self.recompute:
            built = m.get("forward_dtype", "float32")  # build._params records it when not float32
            mine = lm.dtype_name if lm.dtype != torch.float32 else "float32"
            if built != mine:
                raise IndexMismatchError(
                    f"index {version.path} stores no hidden states (--rerank-store recompute): its candidates are "
                    f"encoded again at query time, so the model must run in the dtype of the build ({built}), not "
                    f"{mine}; pass --dtype {built}")
        self.query_top = 32
        self._labels = None  # token id → text, cached (explain)
        self._ids: list[str] | None = None  # ids in row order, read on first use
        self._shape: dict[str, float] | None = None  # sizes of an answer (shape()), read on first use
        self._calibration: tuple[np.ndarray, bool] | None = None  # rows percentiles are counted among
        # flat: exact search over the (checksummed) sketch arrays, built on load; IVF: its stored file
        version.open_all()  # every file open now: serving goes on if gc deletes the version's directory
        info = m["index"]
        self.ann = open_first_stage(info, version.shard_arrays("sketch"), int(m["sketch"]["dim"]),
                                    version.global_file(info["file"]) if info.get("stored") else None)
        if self.ann.ntotal != self.n:
            raise IndexCorruptError(f"index {version.path}: the first stage holds {self.ann.ntotal} vectors but the "
                                    f"manifest counts {self.n} samples; rebuild the index")

    @classmethod
    def open(cls, root: str, lm: LoadedModel, version: str | None = None, verify: bool = True) -> Index:
        return cls(IndexRoot(root).load(version, verify=verify), lm)

    def shape(self) -> dict[str, float]:
        """What sizes an answer of this index version, read from its manifest: rows, the mean bytes of a
        stored row (metadata) and the mean scored tokens of a row (the service's request cost checks). Read
        once per loaded version: every TopK asks for it, and the manifest lists every file of every shard."""
        if self._shape is not None:
            return self._shape
        files = self.manifest.get("files", {})
        n = max(self.n, 1)
        row_bytes = sum(int(f["bytes"]) for p, f in files.items() if p.endswith("metadata.jsonl")) / n
        y_bytes = sum(int(f["bytes"]) - 128 for p, f in files.items() if p.endswith("/y.npy"))
        itemsize = int(self.manifest["arrays"]["y"]["dtype"][-1]) if "y" in self.manifest.get("arrays", {}) else 4
        self._shape = {"rows": self.n, "row_bytes": row_bytes, "row_tokens": max(y_bytes, 0) / itemsize / n}
        return self._shape

    @property
    def accepts_images(self) -> bool:
        """Valuation samples may carry an image: the index was built with a vision-language model."""
        return self.lm.accepts_images

    def encode(self, samples: Sequence[Sample | tuple[str, str]], keep_probs: bool = True) -> Features:
        """Features of valuation samples (one forward pass); with their tokens' distributions when they fit and
        `keep_probs` (what a search needs; scoring every row does not)."""
        config = self.forward if keep_probs else dataclasses.replace(self.forward, probs_bytes=0)
        return extract_features(self.lm.model, self.lm.preprocessor, _pairs(samples), config, self.head)

    def scaled(self, values: torch.Tensor, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """For-Value of training rows `rows` (the last axis of `values`) as this index reports it: divided by
        each row's ‖G‖ in a unit-normalised index, as it is otherwise."""
        if self.row_scale is None:
            return values
        return values * self.row_scale[torch.as_tensor(np.asarray(rows, dtype=np.int64))].to(values.dtype)

    def row_probs(self) -> RowProbs:
        """A memory of training rows' distributions for exact scores (rerank.RowProbs), to share between the
        searches of one batch of queries (`answers(..., shared=)`); valid for this loaded version only."""
        return RowProbs(self._cpu_head)

    def row_scores(self, features: Features, ft: Features, rows: Sequence[int] | np.ndarray,
                   probs: torch.Tensor | None = None, shared: RowProbs | None = None) -> torch.Tensor:
        """Exact values (nq, len(rows)) of training rows `rows`, whose features are `ft`, as the index reports
        them (`scaled`); `probs`: the query tokens' distributions, if known; `shared`: the rows' distributions
        computed once for every search that shares it (`row_probs`)."""
        if shared is not None:
            ft = shared.attach(ft, rows)
        return self.scaled(exact_scores(features, ft, self._cpu_head, pv=probs), rows)

    def row_bounds(self, features: Features, c: Candidates, rows: Sequence[int] | np.ndarray,
                   probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Certified bounds (lo, hi), each (nq, len(rows)), of the values of training rows `rows` (their stored
        candidates `c`) as the index reports them (rerank.score_bounds, `scaled`)."""
        lo, hi = score_bounds(features, c, self._cpu_head, self.query_top, probs=probs)
        return self.scaled(lo, rows), self.scaled(hi, rows)

    def candidate_features(self, rows: Sequence[int]) -> Features:
        """Re-rank features of training rows `rows`, in that order: stored, or (the "recompute" tier) from a new
        forward pass of their stored texts (`recompute_features`)."""
        if self.recompute:
            return self.recompute_features(rows)
        return self._features(self.version.token_rows(np.asarray(rows, dtype=np.int64), ["h", "y", "lse"]))

    def recompute_features(self, rows: Sequence[int]) -> Features:
        """Features of training rows `rows` from a forward pass of their stored samples (metadata: texts, the
        conversation, the image's path) with the index's model and forward settings: what a build of the rows
        computed, to float tolerance (a pass may batch a row with other rows).

        Raises:
            IndexCorruptError: the pass scores other tokens than the build stored for a row (the stored texts,
                the tokenizer or an image file changed since).
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return Features(torch.zeros(0, self.head.dim), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                            torch.zeros(1, dtype=torch.int64))
        samples = [sample_of_row(r).as_input() for r in self.version.rows(rows)]
        f = extract_features(self.lm.model, self.lm.preprocessor, samples, self.forward, self.head).to("cpu")
        stored = self.version.token_rows(rows, ["y"])
        if not (np.array_equal(f.offsets.numpy(), stored["offsets"])
                and np.array_equal(f.y.numpy(), np.asarray(stored["y"], dtype=np.int64))):
            lengths = np.diff(stored["offsets"]), np.diff(f.offsets.numpy())
            bad = next((j for j in range(rows.size) if lengths[0][j] != lengths[1][j]), None)
            where = f"row {int(rows[bad])}" if bad is not None else "a row"
            raise IndexCorruptError(
                f"index {self.version.path}: {where} encoded again scores other tokens than the build stored (the "
                "stored texts, the tokenizer or an image changed since); rebuild the index")
        return f

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
               probs: torch.Tensor | None = None, shared: RowProbs | None = None
               ) -> tuple[np.ndarray, torch.Tensor, int, Known]:
        """The exact top-k of candidate rows `cand` → (rows best first, their exact scores, rows scored exactly,
        what is known of every candidate's value: what the percentiles need not compute again).

        With `prune` (and top probabilities in the index), certified bounds rule out the candidates that
        cannot be in the answer first (rerank.py); the answer is the same as scoring all of them.

        Args:
            probs: the query tokens' distributions over the whole vocabulary (Tv, V), when computed already.
            shared: the candidates' distributions, shared with other searches (`row_probs`).
        """
        return drive(self._rerank_steps(features, cand, k, direction, prune, probs, shared))

    def _rerank_steps(self, features: Features, cand: np.ndarray, k: int, direction: str, prune: bool,
                      probs: torch.Tensor | None, shared: RowProbs | None, calibrate: bool = False) -> Steps:
        """`rerank` as steps (`run_pass`): yields a Need for the rows it is about to score exactly, once, when it
        shares their distributions (`shared`), asking for the calibration rows' bounds too when `calibrate` (the
        search computes percentiles next); returns rerank's answer."""
        keep, bounds = None, None
        if prune and self.rerank_top and k < cand.size:
            c = self.candidates(cand)
            if pruning_pays(features, c.feats.h.shape[0], self._cpu_head, self.query_top):
                lo, hi = self.row_bounds(features, c, cand, probs)
                bounds = (lo.double().mean(0).numpy(), hi.double().mean(0).numpy())
                keep = torch.nonzero(must_score(lo.mean(0), hi.mean(0), k, direction)).flatten()
                ft = c.feats.select(keep)
            else:
                ft = c.feats
        else:
            ft = self.candidate_features(cand)
        rows = cand if keep is None else cand[keep.numpy()]
        if shared is not None:
            yield Need(ft, rows, features if calibrate else None, probs if calibrate else None)
        exact = self.row_scores(features, ft, rows, probs, shared).mean(0)
        order = torch.argsort(exact, descending=(direction == "most"), stable=True)[:k]
        pos = order if keep is None else keep[order]
        ex = exact.double().numpy()
        if bounds is None:  # every candidate scored exactly
            known = Known(cand, ex, ex.copy())
        else:
            known = Known(cand, *bounds)
            known.lo[keep.numpy()] = known.hi[keep.numpy()] = ex
        return cand[pos.numpy()], exact[order], int(exact.numel()), known

    def certify(self, features: Features, cand: np.ndarray, k: int, direction: str, budget: int = DEFAULT_EXACT_BUDGET,
                probs: torch.Tensor | None = None, check: Check | None = None, shared: RowProbs | None = None
                ) -> Certified:
        """The top-k of candidate rows `cand` known by certified intervals (certify.py): every candidate bounded
        (rerank.score_bounds), then at most `budget` of those overlapping at the k boundary (or between hits)
        scored exactly, the widest first, as long as that decides something.

        An index without top probabilities, or a query whose distributions do not fit in memory, has no bounds:
        its candidates are scored exactly (`rerank`) and every interval is a point.

        Args:
            probs: the query tokens' distributions over the whole vocabulary (Tv, V), when computed already.
            shared: the candidates' distributions, shared with other searches (`row_probs`).
        """
        if not self.rerank_top or probs is None or cand.size == 0:
            rows, scores, scored, _ = self.rerank(features, cand, k, direction, True, probs, shared)
            s = scores.double().numpy()
            return Certified(rows, s, s.copy(), np.ones(s.size, dtype=bool), True, scored)
        c = self.candidates(cand)
        lo, hi = (b.double().mean(0).numpy() for b in self.row_bounds(features, c, cand, probs))
        exact = np.zeros(cand.size, dtype=bool)
        while budget > int(exact.sum()):
            pick = to_tighten(lo, hi, k, direction, budget - int(exact.sum()), exact)
            if not pick.size:
                break
            _check(check)
            ft = c.feats.select(torch.from_numpy(pick))
            ex = self.row_scores(features, ft, cand[pick], probs, shared).double().mean(0).numpy()
            # the float32 rounding of an exact score, as the bounds allow for it (rerank.SLACK per |<h, h'>|)
            g = (features.h @ ft.h.T).abs()
            err = SLACK * self.scaled(segment_sum_rows(segment_sum_rows(g, features.segment, features.n).T, ft.segment,
                                                       ft.n).T, cand[pick]).double().mean(0).numpy()
            lo[pick], hi[pick] = ex - err, ex + err
            exact[pick] = True
        order = interval_order(lo, hi, direction)
        ranks, whole = certified_ranks(lo, hi, order, k, direction)
        top = order[:k]
        return Certified(cand[top], lo[top], hi[top], ranks, whole, int(exact.sum()))

    def search(self, samples: Sequence[Sample | tuple[str, str]], k: int = DEFAULT_K, direction: str = "most",
               rerank: int = DEFAULT_RERANK, features: Features | None = None, prune: bool = True, explain: int = 0,
               where: Where | None = None, calibrate: bool = True, check: Check | None = None,
               scores: str = "exact", exact_budget: int = DEFAULT_EXACT_BUDGET, shared: RowProbs | None = None
               ) -> SearchResult:
        """Top-k most (or least) valuable training samples for the group `samples` (scored by the mean of G).

        Args:
            k: answers wanted (clamped to the index size).
            direction: "most" or "least".
            rerank: candidates from the first stage that are scored exactly (>= k).
            features: the queries' features, when already computed (skips the forward pass).
            prune: rule out candidates by certified bounds before exact scoring (same answer, less work).
            explain: > 0: attach to every hit an `Explanation` with this many top token pairs (`Index.explain`).
            where: answer from the training rows whose metadata match only (filters.py); the answer is the
                top-k of that set, as if the index held nothing else. Deleted rows are never returned.
            calibrate: fill each hit's `percentile` and `cosine` (see `Hit`).
            check: called between the steps of the work (first stage, exact re-ranking, explanations); it
                raises to stop the work (the service: the call's deadline passed or it was cancelled).
            scores: "exact": every hit's exact score (costs about k · T · |V| · d, a forward pass of the query);
                "certified": certified intervals from the stored top probabilities (`certify`), the hits'
                ranks and the set certified where the intervals prove them (`Hit.rank_certified`,
                `SearchResult.set_certified`); no percentiles or cosines (they need exact scores).
            exact_budget: certified answers: candidates at most scored exactly to tighten the intervals.
            shared: the training rows' distributions, computed once for the searches that share this object
                (`row_probs`: the searches of one batch of queries); a search of its own keeps one too.
        """
        return drive(self._search_steps(samples, k, direction, rerank, features, prune, explain, where, calibrate,
                                        check, scores, exact_budget, shared))

    def _search_steps(self, samples, k, direction, rerank, features, prune, explain, where, calibrate, check, scores,
                      exact_budget, shared) -> Steps:
        """`search` as steps (`run_pass`, `_rerank_steps`); returns its SearchResult."""
        check_direction(direction)
        check_scores(scores)
        if exact_budget < 0:
            raise ConfigError(f"exact_budget must be >= 0 (candidates scored exactly), got {exact_budget}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if rerank < 0:
            raise ConfigError(f"rerank must be >= 0, got {rerank}")
        if explain < 0:
            raise ConfigError(f"explain must be >= 0 (top token pairs per hit; 0 = no explanation), got {explain}")
        if features is None:
            if not samples:
                raise ConfigError("search needs at least one valuation sample")
            features = self.encode(samples)
        scope = self.scope(where)
        size = self.n if scope is None else int(scope.size)
        if size == 0:
            return SearchResult([], self.version.name, direction, 0, 0, tuple(features.cut_samples), scores=scores,
                                set_certified=True if scores == "certified" else None)
        k = min(k, size)
        C = min(max(rerank, k), size)
        # the query tokens' distributions, computed once for the sketch, the bounds and the exact scores (kept
        # by the forward pass, from the logits of the log-partition, when they fit)
        if features.probs is not None and features.probs.device == features.h.device:
            probs = features.probs
        elif query_probs_fit(features, self._cpu_head):
            probs = self._cpu_head.probs(features.h, features.lse)
        else:
            probs = None
        q = self.query_sketches(features, probs).mean(0, keepdim=True)
        qs = q.numpy().astype(np.float32)
        cand = self._first_stage(qs, C, direction, scope, bool(where))
        _check(check)
        shared = self.row_probs() if shared is None else shared
        if scores == "certified":
            return self._certified_result(features, cand, k, direction, exact_budget, probs, explain, check, shared)
        # percentiles bound every calibration row: a batch does it for all its queries at once (`run_pass`)
        share_cal = calibrate and self.rerank_top > 0 and probs is not None and not self.recompute
        rows, scores, scored, known = yield from self._rerank_steps(features, cand, k, direction, prune, probs, shared,
                                                                    share_cal)
        meta = self.version.rows(rows)
        pct = (self.percentiles(features, rows, scores, probs, known, check, shared) if calibrate
               else [(None, None, None)] * len(meta))
        cos = self.cosines(features, rows, scores, probs) if calibrate else [None] * len(meta)
        hits = [Hit(id=str(md["id"]), score=float(s), rank=r + 1, row=int(row), metadata=md, percentile=p[0],
                    cosine=c, percentile_low=p[1], percentile_high=p[2])
                for r, (s, row, md, p, c) in enumerate(zip(scores.tolist(), rows.tolist(), meta, pct, cos))]
        if explain:
            _check(check)
            found = self.explain(features, rows, explain, probs, shared)
            hits = [dataclasses.replace(h, explanation=e) for h, e in zip(hits, found)]
        return SearchResult(hits, self.version.name, direction, int(cand.size), scored, tuple(features.cut_samples))

    def _certified_result(self, features: Features, cand: np.ndarray, k: int, direction: str, budget: int,
                          probs: torch.Tensor | None, explain: int, check: Check | None, shared: RowProbs
                          ) -> SearchResult:
        c = self.certify(features, cand, k, direction, budget, probs, check, shared)
        meta = self.version.rows(c.rows)
        hits = [Hit(id=str(md["id"]), score=(lo + hi) / 2, rank=r + 1, row=int(row), metadata=md, score_low=lo,
                    score_high=hi, rank_certified=bool(ok))
                for r, (row, md, lo, hi, ok) in enumerate(zip(c.rows.tolist(), meta, c.lo.tolist(), c.hi.tolist(),
                                                               c.ranks.tolist()))]
        if explain:
            _check(check)
            found = self.explain(features, c.rows, explain, probs, shared)
            hits = [dataclasses.replace(h, explanation=e) for h, e in zip(hits, found)]
        return SearchResult(hits, self.version.name, direction, int(cand.size), c.scored,
                            tuple(features.cut_samples), scores="certified", set_certified=c.whole)

    def scope(self, where: Where | None = None) -> np.ndarray | None:
        """Sorted rows (int64) an answer may hold: matching `where` and not deleted; None = all n rows."""
        if not where and not self.deleted.rows.size:
            return None
        mask = self.fields.mask(where) if where else np.ones(self.n, dtype=bool)
        mask[self.deleted.rows] = False
        return np.flatnonzero(mask).astype(np.int64)

    def _first_stage(self, q: np.ndarray, C: int, direction: str, scope: np.ndarray | None, filtered: bool
                     ) -> np.ndarray:
        """The C best rows of `scope` (all rows if None) by sketch inner product with q (1, D)."""
        if scope is None:
            _, ids = self.ann.search(q, C, direction)
            return ids[0][ids[0] >= 0]
        gone = self.deleted.rows
        if not filtered and gone.size <= max(1024, self.n // 8):
            # deletions only, and few: search past them (the best C of the rest are among the best C + |gone|)
            _, ids = self.ann.search(q, min(C + gone.size, self.n), direction)
            ids = ids[0][ids[0] >= 0]
            return ids[~np.isin(ids, gone)][:C]
        # a filter: score exactly the rows in scope (selective filters cost |scope|, not n)
        s = self.subset_sketch_scores(q, scope)
        key = -s if direction == "most" else s
        if C < s.size:
            part = np.argpartition(key, C - 1)[:C]
            part = part[np.lexsort((scope[part], key[part]))]
        else:
            part = np.lexsort((scope, key))
        return scope[part]

    def subset_sketch_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """First-stage scores <q, s_i> (1, D) of the given rows → (len(rows),), a chunk of rows at a time."""
        out = np.empty(rows.size, dtype=np.float32)
        step = self.ann.chunk_rows
        for a in range(0, rows.size, step):
            out[a : a + step] = self.ann.inner_products(q, rows[a : a + step])[0]
        return out

    def calibration_rows(self) -> tuple[np.ndarray, bool]:
        """(rows percentiles are counted among, whether they are all live rows): every live (not deleted) row,
        or above the manifest's calibration rows (at most config.CALIBRATION_ROWS) a sample of that many drawn
        with its calibration seed. Drawn once per loaded version."""
        if self._calibration is None:
            live = np.setdiff1d(np.arange(self.n, dtype=np.int64), self.deleted.rows)
            # indexes built before the manifest recorded it: the rows and seed used then
            cal = self.manifest.get("calibration", {"rows": CALIBRATION_ROWS, "seed": 0})
            size = min(int(cal["rows"]), CALIBRATION_ROWS)  # indexes built when the sample was 8,192 rows
            whole = live.size <= size
            if not whole:
                live = np.sort(np.random.default_rng(cal["seed"]).choice(live, size, replace=False))
            self._calibration = (live, whole)
        return self._calibration

    def value_bounds(self, features: Features, rows: np.ndarray, probs: torch.Tensor | None = None,
                     block: int = 256, check: Check | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Certified bounds lo <= S <= hi of the group-mean value of training rows `rows` → ((r,), (r,)) float64:
        rerank.score_bounds from the stored top probabilities, or exact scores (lo = hi) on an index without
        them or a query whose distributions do not fit in memory (`check`: called before each block)."""
        lo, hi = self._sample_bounds(features, rows, probs, block, check)
        return lo.mean(0).numpy(), hi.mean(0).numpy()

    def _sample_bounds(self, features: Features, rows: np.ndarray, probs: torch.Tensor | None, block: int = 256,
                       check: Check | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`value_bounds` for every query sample of `features` on its own → ((n, r), (n, r)) float64, `block`
        training rows at a time."""
        lo = torch.empty(features.n, rows.size, dtype=torch.float64)
        hi = torch.empty(features.n, rows.size, dtype=torch.float64)
        for a in range(0, rows.size, block):
            _check(check)
            part = rows[a : a + block]
            if self.rerank_top and probs is not None:
                lo[:, a : a + part.size], hi[:, a : a + part.size] = self.row_bounds(
                    features, self.candidates(part), part, probs)
            else:
                lo[:, a : a + part.size] = hi[:, a : a + part.size] = self.row_scores(
                    features, self.candidate_features(part), part, probs)
        return lo, hi

    def percentiles(self, features: Features, rows: np.ndarray, scores: torch.Tensor,
                    probs: torch.Tensor | None = None, known: Known | None = None, check: Check | None = None,
                    shared: RowProbs | None = None) -> list[tuple[float, float, float]]:
        """Calibrated scores of hits: (percentile, low, high) of each hit's exact score (calibration.py).

        The percentile of row i is the share of the other live rows whose exact value to the query is strictly
        lower, #{j != i : S_j < S_i} / (n_live - 1): 1.0 for the most valuable row, 0.0 for the least, as `rank`
        writes it. Exact (low = high = percentile) on indexes of at most the manifest's calibration rows: every
        row is bounded (`value_bounds`) and the rows whose bounds contain a hit's score are scored exactly.
        Larger indexes count among a seeded sample of that many rows: the share in the sample, and its 99%
        Wilson interval (low, high). None on an index of the "recompute" storage tier (bounding a row needs its
        hidden states: a forward pass per calibration row and query).

        Args:
            features: the query group's features. rows: the hits' rows (m,). scores: their exact scores (m,).
            probs: the query tokens' distributions over the whole vocabulary (Tv, V), when computed already.
            known: bounds and exact scores computed already (the re-ranking's), not computed again.
            check: called between blocks of rows (raises to stop the work).
            shared: the rows' distributions, shared with other searches (`row_probs`).
        """
        cal, whole = self.calibration_rows()
        # the recompute tier would pay a forward pass per calibration row and query: no percentiles there
        if cal.size == 0 or scores.numel() == 0 or self.recompute:
            return [(None, None, None)] * scores.numel()
        s = scores.double().numpy()
        lo, hi = np.full(cal.size, np.nan), np.full(cal.size, np.nan)
        if known is not None:
            at, found = _positions(cal, known.rows)
            lo[at[found]], hi[at[found]] = known.lo[found], known.hi[found]
        rest = np.flatnonzero(np.isnan(lo))
        done = shared.calibration.get(id(features)) if shared is not None else None  # bounded by run_pass
        if rest.size and done is not None and done[0] is features:
            lo[rest], hi[rest] = done[1][rest], done[2][rest]
        elif rest.size:
            lo[rest], hi[rest] = self.value_bounds(features, cal[rest], probs, check=check)
        at, mine = _positions(cal, rows)
        lo[at[mine]] = hi[at[mine]] = s[mine]  # the hits' own exact scores (a row is never below itself)
        todo = np.flatnonzero(undecided(s, lo, hi))
        if todo.size:
            ex = self.score_rows(features, cal[todo], check=check, probs=probs, shared=shared).double().mean(0).numpy()
            lo[todo] = hi[todo] = ex
        counts = count_lower(s, lo, hi)
        return percentiles_of(counts, cal.size - mine.astype(np.int64), whole)

    def query_norm(self, features: Features, probs: torch.Tensor | None = None) -> float:
        """‖Ḡ‖ of the query group, Ḡ = mean of its members' G: sqrt(mean_vv' S(v, v'))."""
        if probs is not None and probs.device == features.h.device:  # known already: no pass over the head
            return float(mean_self_score(features, probs).clamp(min=0).sqrt())
        if features.n == 1:
            if self.head.weight.device.type != "cpu":  # a pass over the whole vocabulary: on the model's device
                return float(g_norms(features.to(self.head.weight.device), self.head)[0])
            return float(g_norms(features, self._cpu_head)[0])
        return float(exact_scores(features, features, self._cpu_head, pv=probs).mean().clamp(min=0).sqrt())

    def cosines(self, features: Features, rows: np.ndarray, scores: torch.Tensor,
                probs: torch.Tensor | None = None) -> list[float | None]:
        """Calibrated scores: score / (‖Ḡ_query‖·‖G_row‖), exact, in [-1, 1]; None where the index stores no
        norms (built before they were) or a norm is 0."""
        if self.g_norm is None or len(rows) == 0:
            return [None] * len(rows)
        qn = self.query_norm(features, probs)
        norms = self.g_norm[torch.as_tensor(np.asarray(rows, dtype=np.int64))].double()
        unit = self.row_scale is not None  # the scores are divided by ‖G_row‖ already
        out = []
        for s, g in zip(scores.double().tolist(), norms.tolist()):
            out.append(None if qn <= 0 or g <= 0 else max(-1.0, min(1.0, s / (qn * (1.0 if unit else g)))))
        return out

    def score_rows(self, features: Features, rows: np.ndarray, block: int = 512, check: Check | None = None,
                   probs: torch.Tensor | None = None, shared: RowProbs | None = None) -> torch.Tensor:
        """Exact For-Value of training rows `rows` for each query row → (nq, len(rows)), streaming over the store
        (`check` is called before each block of rows; `probs`: the query tokens' distributions, if known;
        `shared`: as `row_scores`)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = torch.empty(features.n, rows.size)
        for a in range(0, rows.size, block):
            _check(check)
            part = rows[a : a + block]
            out[:, a : a + part.size] = self.row_scores(features, self.candidate_features(part), part, probs, shared)
        return out

    def group_by(self, samples: Sequence[Sample | tuple[str, str]], field: str, k: int = 3, direction: str = "most",
                 where: Where | None = None, features: Features | None = None, max_groups: int = 0,
                 max_rows: int = 0, check: Check | None = None) -> GroupedResult:
        """Total and mean value of each value of metadata `field` (e.g. which dataset drove this output), with
        the top-k rows inside each group. Exact: every row in scope (`where`, not deleted) is scored exactly,
        one pass over their re-rank data, so narrow large indexes with `where`.

        Args:
            field: a metadata field (filters.py). k: top rows kept per group (0 = none).
            direction: "most": groups by total descending, rows by value descending; "least": ascending.
            max_groups: keep only the first groups in that order (0 = all).
            max_rows: refuse (ConfigError) when more rows than this are in scope (0 = no limit).
        """
        check_direction(direction)
        if k < 0 or max_groups < 0:
            raise ConfigError(f"k and max_groups must be >= 0, got {k}, {max_groups}")
        check_field(field, "group_by")
        codes, keys = self.fields.codes(field)
        if features is None:
            if not samples:
                raise ConfigError("group_by needs at least one valuation sample")
            features = self.encode(samples)
        scope = self.scope(where)
        rows = np.arange(self.n, dtype=np.int64) if scope is None else scope
        if max_rows and rows.size > max_rows:
            raise ConfigError(f"group_by scores every training sample in scope exactly: {rows.size} are in scope, "
                              f"more than the limit {max_rows}; narrow the query with where")
        values = self.score_rows(features, rows, check=check).mean(0).double().numpy() if rows.size else np.zeros(0)
        c = codes[rows]
        most = direction == "most"
        groups = []
        for code in np.unique(c).tolist():
            sel = np.flatnonzero(c == code)
            v = values[sel]
            total = float(v.sum())
            order = np.lexsort((rows[sel], -v if most else v))[:k]
            meta = self.version.rows(rows[sel][order])
            hits = [Hit(id=str(md["id"]), score=float(v[o]), rank=r + 1, row=int(rows[sel][o]), metadata=md)
                    for r, (o, md) in enumerate(zip(order.tolist(), meta))]
            groups.append(Group(None if code < 0 else keys[code], int(sel.size), total, total / sel.size, hits))
        groups.sort(key=lambda g: (-g.total if most else g.total, g.key is None, g.key or ""))
        if max_groups:
            groups = groups[:max_groups]
        return GroupedResult(field, groups, self.version.name, direction, int(rows.size), tuple(features.cut_samples))

    def explain(self, query: Features | Sequence[Sample | tuple[str, str]], rows: Sequence[int], pairs: int = 10,
                probs: torch.Tensor | None = None, shared: RowProbs | None = None) -> list[Explanation]:
        """Which (query token, training token) pairs make the score of each training row `rows` (explain.py).

        Args:
            query: the query group's features, or its samples (one forward pass).
            rows: training rows of this index version.
            pairs: top pairs (by |contribution|) kept per row.
            probs: the query tokens' distributions over the whole vocabulary (Tv, V), when computed already.
            shared: the rows' distributions, computed already by the search that found them (`row_probs`).

        Returns:
            One Explanation per row, in order; its total is the row's exact score (group mean).
        """
        if pairs < 0:
            raise ConfigError(f"pairs must be >= 0, got {pairs}")
        if len(rows) == 0:
            return []
        features = query if isinstance(query, Features) else self.encode(query)
        if probs is None and query_probs_fit(features, self._cpu_head):
            probs = self._cpu_head.probs(features.h, features.lse)
        if self._labels is None:
            self._labels = token_labeler(self.lm.tokenizer)
        ft = self.candidate_features(rows)
        if shared is not None:
            ft = shared.attach(ft, rows)
        found = explain_rows(features, ft, self._cpu_head, self._labels, pairs, probs)
        if self.row_scale is None:
            return found
        return [scale_explanation(e, float(self.row_scale[int(r)])) for e, r in zip(found, rows)]

    def query_sketches(self, features: Features, probs: torch.Tensor | None = None) -> torch.Tensor:
        """First-stage sketches of the query rows → (nq, dim) (`probs`: their tokens' distributions, if known)."""
        return self.sketcher.sketch(features, self._cpu_head, probs=probs)

    def sketch_scores(self, sketches: torch.Tensor) -> torch.Tensor:
        """First-stage scores of every training row for each query sketch (nq, dim) → (nq, n)."""
        return torch.from_numpy(self.ann.all_scores(sketches.float().numpy()))

    def score_matrix(self, features: Features, block: int = 512) -> torch.Tensor:
        """Exact For-Value of every training row (deleted ones included) for each query row → (nq, n)."""
        return self.score_rows(features, np.arange(self.n), block)

    # --- the calls of the service's client (`client.InfluenceClient`): same names, arguments and results ------

    def top_k(self, samples: Sequence[Sample | tuple[str, str]], k: int = DEFAULT_K, direction: str = "most",
              rerank: int = DEFAULT_RERANK, group: bool = True, max_text_chars: int = 0, explain: int = 0,
              where: Where | None = None, scores: str = "exact", exact_budget: int = DEFAULT_EXACT_BUDGET
              ) -> list[tuple[int, SearchResult]]:
        """Every answer of one query: [(query index, or GROUP = -1 for the group, result)], as the client's.

        Args:
            direction: "most", "least" or "both" (two answers per query: most, then least).
            group: one answer for the mean of `samples`; False: one per sample.
            max_text_chars: cut the hits' prompts and responses to this many characters (0 = whole).
            explain: > 0: every hit carries an `Explanation` with this many top token pairs.
            scores, exact_budget: exact scores, or certified intervals (`search`).
        """
        check_direction(direction, both=True)
        check_scores(scores)
        if not samples:
            raise ConfigError("top_k needs at least one valuation sample")
        directions = DIRECTIONS if direction == "both" else (direction,)
        found = self.answers(self.encode(samples), k, directions, rerank, group, explain, where,
                             scores=scores, exact_budget=exact_budget)
        return [(q, cut_texts(r, max_text_chars)) for q, r in found]

    def answers(self, features: Features, k: int, directions: Sequence[str], rerank: int = DEFAULT_RERANK,
                group: bool = True, explain: int = 0, where: Where | None = None, group_by: str = "",
                max_rows: int = 0, check: Check | None = None, scores: str = "exact",
                exact_budget: int = DEFAULT_EXACT_BUDGET, shared: RowProbs | None = None
                ) -> list[tuple[int, SearchResult | GroupedResult]]:
        """The answers to one query from its samples' features (one forward pass, done): per direction, one for
        the group (query index GROUP) or one per sample; `group_by` makes each a `GroupedResult` (k rows per
        group, at most `max_rows` rows in scope, exact whatever `scores`). `check` is called before each answer
        and within it; `scores`, `exact_budget`: as `search`; `shared`: the training rows' distributions, shared by
        these answers and whatever else shares the object (`row_probs`: a batch of queries)."""
        return drive(self.answer_steps(features, k, directions, rerank, group, explain, where, group_by, max_rows,
                                       check, scores, exact_budget, shared))

    def run_pass(self, steps: Sequence[Steps], shared: RowProbs) -> list[tuple[Any, BaseException | None]]:
        """Runs the searches of one batch of queries (`answer_steps`, all sharing `shared`) in two phases →
        (answer, None) or (None, its error) for each, in order.

        Each one runs up to the training rows it first scores exactly (its `Need`); then the distributions of
        all those rows not known yet are computed together (`RowProbs.prefill`: a few large products instead of
        one small one per search), and the calibration rows are bounded for every query that computes
        percentiles (`calibration_bounds`: the same rows for all, bounded together); then each runs to its end.
        The answers are those of running each one alone.
        """
        out: list[tuple[Any, BaseException | None]] = [(None, None)] * len(steps)
        waiting, needs = [], []
        for j, s in enumerate(steps):
            try:
                needs.append(next(s))
                waiting.append(j)
            except StopIteration as done:
                out[j] = (done.value, None)
            except Exception as exc:  # this search's own error
                out[j] = (None, exc)
        shared.prefill([(n.ft, n.rows) for n in needs])
        queries = {id(n.query): n for n in needs if n.query is not None and id(n.query) not in shared.calibration}
        if queries:
            found = self.calibration_bounds([n.query for n in queries.values()], [n.probs for n in queries.values()])
            shared.calibration.update((key, (n.query, *b)) for (key, n), b in zip(queries.items(), found))
        for j in waiting:
            try:
                out[j] = (drive(steps[j]), None)
            except Exception as exc:
                out[j] = (None, exc)
        return out

    def calibration_bounds(self, queries: Sequence[Features], probs: Sequence[torch.Tensor], block: int = 256,
                           max_tokens: int = 2048) -> list[tuple[np.ndarray, np.ndarray]]:
        """`value_bounds` of every calibration row (`calibration_rows`, in that order) for each query group of
        `queries` (`probs`: each one's tokens' distributions) → [(lo, hi)], computed for many queries at once
        (groups of at most `max_tokens` query tokens): each block of calibration rows is read once and bounded
        against all of them."""
        cal, _ = self.calibration_rows()
        fv = Features.concat([dataclasses.replace(q, probs=p) for q, p in zip(queries, probs)])
        lo = torch.empty(fv.n, cal.size, dtype=torch.float64)
        hi = torch.empty(fv.n, cal.size, dtype=torch.float64)
        for a, b in sample_blocks(fv, max_tokens):  # each sample's bounds are its own: blocks may split a group
            part = fv.select(range(a, b))
            lo[a:b], hi[a:b] = self._sample_bounds(part, cal, part.probs, block)
        out, s = [], 0
        for q in queries:
            out.append((lo[s : s + q.n].mean(0).numpy(), hi[s : s + q.n].mean(0).numpy()))
            s += q.n
        return out

    def answer_steps(self, features: Features, k: int, directions: Sequence[str], rerank: int = DEFAULT_RERANK,
                     group: bool = True, explain: int = 0, where: Where | None = None, group_by: str = "",
                     max_rows: int = 0, check: Check | None = None, scores: str = "exact",
                     exact_budget: int = DEFAULT_EXACT_BUDGET, shared: RowProbs | None = None) -> Steps:
        """`answers` as steps for `run_pass`: before each exact re-ranking it yields the (features, rows) it is
        about to score exactly (when `shared`), and it returns the answers."""
        shared = self.row_probs() if shared is None else shared

        def one(f: Features, d: str) -> Steps:
            _check(check)
            if group_by:
                return self.group_by([], group_by, k, d, where=where, features=f, max_rows=max_rows, check=check)
            return (yield from self._search_steps([], k, d, rerank, f, True, explain, where, True, check, scores,
                                                  exact_budget, shared))

        out: list[tuple[int, SearchResult | GroupedResult]] = []
        if group:
            for d in directions:
                out.append((GROUP, (yield from one(features, d))))
            return out
        # one answer per sample: its cut_samples name the sample's index in the request, not 0
        for i in range(features.n):
            for d in directions:
                r = yield from one(features.select([i]), d)
                out.append((i, dataclasses.replace(r, cut_samples=(i,) if r.cut_samples else ())))
        return out

    def scores(self, samples: Sequence[Sample | tuple[str, str]], where: Where | None = None,
               batch: int = DEFAULT_SCORE_BATCH, features: Features | None = None, check: Check | None = None
               ) -> Scores:
        """The exact value of every training row in scope (matching `where`, not deleted) to the group
        `samples` (the mean over its members), `batch` samples per forward pass (or their `features`), and
        each row's cosine, value / (‖Ḡ‖·‖G_row‖) with Ḡ the group's mean G (`row_cosines`)."""
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        if features is None and not samples:
            raise ConfigError("scores needs at least one valuation sample")
        scope = self.scope(where)
        rows = np.arange(self.n, dtype=np.int64) if scope is None else scope
        total = np.zeros(rows.size, dtype=np.float64)
        parts = [features] if features is not None else (
            self.encode(samples[a : a + batch], keep_probs=False) for a in range(0, len(samples), batch))
        n, cut, kept = 0, [], []
        for f in parts:
            if rows.size:
                total += self.score_rows(f, rows, check=check).double().sum(0).numpy()
            cut += [n + j for j in f.cut_samples]
            n += f.n
            kept.append(f)
        ids = self.ids()
        values = total / max(n, 1)
        _check(check)
        return Scores([ids[r] for r in rows.tolist()], rows.tolist(), values, self.version.name, tuple(cut),
                      cosines=self.row_cosines(kept, rows, values))

    def row_cosines(self, parts: Sequence[Features], rows: np.ndarray, values: np.ndarray) -> np.ndarray | None:
        """value / (‖Ḡ‖·‖G_row‖) of each row (NaN where a norm is 0), Ḡ the mean G of the group whose
        features are `parts` (score.group_norm); None on an index without stored norms."""
        if self.g_norm is None:
            return None
        qn = group_norm(parts, self._cpu_head)
        g = self.g_norm[torch.as_tensor(rows, dtype=torch.int64)].double().numpy()
        div = 1.0 if self.row_scale is not None else g  # a unit index's values are divided by ‖G_row‖ already
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where((g > 0) & (qn > 0), values / (qn * div), np.nan)
        return np.clip(cos, -1.0, 1.0)

    def score_all(self, samples: Sequence[Sample | tuple[str, str]], chunk_size: int = 0,
                  return_version: bool = False, where: Where | None = None
                  ) -> tuple[list[str], np.ndarray] | tuple[list[str], np.ndarray, str]:
        """(ids, exact values (n,) float64[, version]) of every training row in scope, as the client's
        (`chunk_size` only shapes the service's stream: no effect here)."""
        s = self.scores(samples, where)
        return (s.ids, s.values, s.version) if return_version else (s.ids, s.values)

    def info(self) -> dict:
        """The index version: index_version, model_name, model_fingerprint, tokens, n_samples, sketch_dim,
        index_kind and its manifest (without file checksums), as the client's."""
        return index_info(self.manifest, self.version.name)

    def ids(self) -> list[str]:
        """Training sample ids in row order (read once)."""
        if self._ids is None:
            self._ids = [str(row["id"]) for row in self.version.rows(list(range(self.n)))]
        return self._ids

    def close(self) -> None:
        """Nothing to release (the files stay open while the object lives); there for `with`, as the client's."""

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
