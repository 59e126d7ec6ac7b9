"""The answers forvalue gives, as plain data: hits, search results, groups, explanations.

Shared by the in-process `Index`, the gRPC server's converters and the Python client, so this module
imports neither torch nor numpy: `from forvalue.client import InfluenceClient` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError

DIRECTIONS = ("most", "least")
DEFAULT_K = 10  # answers per query
DEFAULT_RERANK = 100  # first-stage candidates scored exactly
SCORE_MODES = ("exact", "certified")  # what a hit's score is: exact, or a certified interval (certify.py)
DEFAULT_EXACT_BUDGET = 2  # certified answers: candidates scored exactly to tighten the intervals at the boundary
DEFAULT_SCORE_BATCH = 64  # valuation samples per forward pass (or per request) when scoring every row
GROUP = -1  # the query index of an answer for the whole group of valuation samples (not one of its members)


@dataclass(frozen=True)
class TokenContribution:
    """One scored token and its share of a score.

    Attributes:
        token: text of the target token (the token this position predicts).
        position: 0-based index among its sample's scored tokens.
        contribution: its row sum (query token) or column sum (training token) of C.
        sample: the query group member it belongs to (0 for a training token or a single query).
    """

    token: str
    position: int
    contribution: float
    sample: int = 0


@dataclass(frozen=True)
class PairContribution:
    """One (query token, training token) pair and its term C[k, k'] of a score.

    Attributes:
        query_position, train_position: 0-based indices among the scored tokens of each sample.
        query_token, train_token: texts of their target tokens.
        contribution: C[k, k'] = <h_k, h_k'> · α_kk' / nv.
        query_sample: the query group member of the query token (0 for a single query).
    """

    query_position: int
    train_position: int
    query_token: str
    train_token: str
    contribution: float
    query_sample: int = 0


@dataclass(frozen=True)
class Explanation:
    """Why one training sample has its score for a query.

    Attributes:
        query_tokens: every scored token of the query (group members in order) with its row sum.
        train_tokens: every scored token of the training sample with its column sum.
        top_pairs: the pairs with the largest |C[k, k']|, largest first.
        total: Σ C = the score (query_tokens and train_tokens each sum to it too).
    """

    query_tokens: list[TokenContribution]
    train_tokens: list[TokenContribution]
    top_pairs: list[PairContribution]
    total: float


def scale_explanation(e: Explanation, factor: float) -> Explanation:
    """An explanation of a score multiplied by `factor` (a unit-normalised index's 1 / ‖G_row‖): every
    contribution and the total, so that they still sum to the score."""
    return Explanation([replace(t, contribution=t.contribution * factor) for t in e.query_tokens],
                       [replace(t, contribution=t.contribution * factor) for t in e.train_tokens],
                       [replace(p, contribution=p.contribution * factor) for p in e.top_pairs], e.total * factor)


@dataclass(frozen=True)
class Hit:
    """One training sample in an answer.

    Attributes:
        id: the training sample's id. score: exact For-Value to the query (group mean).
        rank: 1-based rank in this answer. row: row number in the index version. metadata: stored row.
        percentile: calibrated score, the share of the index's other (live) training samples whose exact
            value to this query is strictly lower than this one's, #{j != i : S_j < S_i} / (n - 1), in [0, 1]
            (1.0: the most valuable row; see `Index.percentiles`); None when not computed. Exact on indexes
            of at most the calibration rows (2,048 by default); on larger ones the share in a seeded sample.
        percentile_low, percentile_high: the interval the percentile is known to lie in: both equal to it
            when it is exact, else a 99% interval of the sampled share; None when not computed (or from a
            server that predates them).
        cosine: calibrated score, score / (‖G_query‖·‖G_row‖) in [-1, 1] (exact); None when the index
            stores no norms (built before they were stored).
        explanation: which token pairs make the score (`Index.search(..., explain=P)`); None when not asked.
        score_low, score_high: certified answers (`scores="certified"`): the interval the exact score is
            proven to lie in (score is its midpoint; all three equal up to float rounding where the hit was
            scored exactly); None in exact answers.
        rank_certified: certified answers: exact re-ranking of the same candidates gives this hit this rank
            (no candidate after it can score more, none before it less; certify.py); None in exact answers.
    """

    id: str
    score: float
    rank: int
    row: int
    metadata: dict
    percentile: float | None = None
    cosine: float | None = None
    explanation: Explanation | None = None
    percentile_low: float | None = None
    percentile_high: float | None = None
    score_low: float | None = None
    score_high: float | None = None
    rank_certified: bool | None = None

    @property
    def percentile_exact(self) -> bool:
        """The percentile is exact (its interval is one point)."""
        return self.percentile_low is not None and self.percentile_low == self.percentile_high


@dataclass(frozen=True)
class SearchResult:
    """One answer.

    Attributes:
        hits: best first. version: the index version that answered. direction: "most" or "least".
        candidates: first-stage candidates considered. exact_scored: how many of them were scored exactly
            (the others were ruled out by certified bounds, see rerank.py); None when not reported.
        cut_samples: the valuation samples of this answer (their indices in the request) that were longer
            than the model's max_length and were shortened: the answer values what the model saw of them.
        scores: "exact" (every hit's score exact) or "certified" (hits carry certified intervals, see `Hit`).
        set_certified: certified answers: exact re-ranking of the same candidates returns the same set of
            hits (their order: `Hit.rank_certified`); None in exact answers.
    """

    hits: list[Hit]
    version: str
    direction: str
    candidates: int
    exact_scored: int | None = None
    cut_samples: tuple[int, ...] = ()
    scores: str = "exact"
    set_certified: bool | None = None

    @property
    def certified_prefix(self) -> int | None:
        """Certified answers: how many leading hits have certified ranks (the first uncertified position,
        0-based; len(hits) when all are); None in exact answers."""
        if self.scores != "certified":
            return None
        return next((i for i, h in enumerate(self.hits) if not h.rank_certified), len(self.hits))


@dataclass(frozen=True)
class Group:
    """One value of the group-by field in a `GroupedResult`.

    Attributes:
        key: the field's value (canonical text, filters.value_key); None for the rows that lack the field.
        count: training rows in the group (in scope). total: Σ of their exact values to the query.
        mean: total / count. hits: the group's top rows, best first (exact scores, ranks within the group).
    """

    key: str | None
    count: int
    total: float
    mean: float
    hits: list[Hit]


@dataclass(frozen=True)
class GroupedResult:
    """Source aggregation: which values of `field` (e.g. which dataset) drove the output.

    Attributes:
        field: the group-by field. groups: ordered by total, largest first ("most") or smallest first
            ("least"). version: the index version. direction: "most" or "least". scored: rows scored exactly.
    """

    field: str
    groups: list[Group]
    version: str
    direction: str
    scored: int
    cut_samples: tuple[int, ...] = ()  # as SearchResult.cut_samples


@dataclass(frozen=True)
class Scores:
    """The exact value of every training row in scope to a valuation group (`score_all`'s full answer).

    Attributes:
        ids: training sample ids, in row order. rows: their row numbers in the index version.
        values: exact For-Value of each row to the group (the mean over its members), float64.
        version: the index version that answered ("" for an empty answer from a server).
        cosines: each row's value / (‖Ḡ‖·‖G_row‖), Ḡ the mean G of the valuation group: numpy float64 (n,) in
            [-1, 1], NaN where a norm is 0; None when unknown (an index without stored norms; from a server,
            a valuation set sent in more than one request).
    """

    ids: list[str]
    rows: list[int]
    values: Any  # numpy float64 array (n,)
    version: str
    cut_samples: tuple[int, ...] = ()  # as SearchResult.cut_samples
    cosines: Any = None


def check_scores(scores: str) -> str:
    """`scores` if it is one of SCORE_MODES, else ConfigError naming them."""
    if scores not in SCORE_MODES:
        raise ConfigError(f"scores must be one of {', '.join(SCORE_MODES)}, got {scores!r}")
    return scores


def check_direction(direction: str, both: bool = False) -> str:
    """`direction` itself when it is "most" or "least" (or "both" where allowed).

    Raises:
        ConfigError: another name.
    """
    allowed = DIRECTIONS + (("both",) if both else ())
    if direction not in allowed:
        raise ConfigError(f"direction must be one of {allowed}, got {direction!r}")
    return direction


def cut_texts(result: SearchResult, limit: int) -> SearchResult:
    """`result` with every hit's prompt and response cut to `limit` characters (0 = whole)."""
    if not limit:
        return result
    hits = [replace(h, metadata={**h.metadata, **{f: str(h.metadata[f])[:limit] for f in ("prompt", "response")
                                                 if f in h.metadata}}) for h in result.hits]
    return replace(result, hits=hits)


def index_info(manifest: dict, version: str) -> dict:
    """What `info()` returns for an index version: its name, model, scope, size and manifest (no checksums)."""
    return {"index_version": version, "model_name": manifest["model"]["name"],
            "model_fingerprint": manifest["model"]["fingerprint"], "tokens": manifest["tokens"],
            "n_samples": int(manifest["n_samples"]), "sketch_dim": int(manifest["sketch"]["dim"]),
            "index_kind": manifest["index"]["kind"],
            "manifest": {k: (brief_index(v) if k == "index" else v) for k, v in manifest.items() if k != "files"}}


def brief_index(info: dict) -> dict:
    """A manifest's "index" section with the norm-ranged lists' per-list numbers counted, not listed (a few
    thousand at 1M rows; the index reads them, people do not)."""
    if not isinstance(info, dict) or not isinstance(info.get("list_order"), dict):
        return info
    lists = len(info["list_order"].get("scale", []))
    return {**info, "list_order": f"{lists} lists: scale and spread per list (in the manifest file)"}
