"""The configuration of forvalue's offline work, as frozen dataclasses, and the names its options take.

Torch-free on purpose: the command line takes its option defaults and choices from here without loading a
model library, and the modules that do the work (forward, sketch, firststage, build, score) import from here.
Change a config with `dataclasses.replace`; validation is in each `__post_init__` (ConfigError).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError
from .formats import Schema

TOKEN_SCOPES = ("response", "all")  # scored positions: the response (+EOS), or every position
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # precision of the forward pass (model.DTYPES)
CPU_MAX_BATCH = 64  # samples per forward batch on a CPU
# padded tokens per forward pass of a batch of queries on a CPU: a server's batch is run as length-sorted
# passes of about this many tokens (less padding, activations that stay in cache). Measured on a 2-core CPU,
# bare passes over 60 queries of 28-49 tokens: SmolLM2-135M 7.6 q/s at 8-12 queries a pass against 6.8 at 32;
# the Qwen2.5-0.5B architecture 2.31 q/s at 16 against 2.11 at 32 (docs/results.md, "The service")
CPU_QUERY_BATCH_TOKENS = 512
METHODS = ("exact", "inbatch", "shared", "emb")  # scoring methods of `forvalue eval` (score.py)
STRATEGIES = ("auto", "pairs", "gram")
INDEX_KINDS = ("flat-ip", "ivf-sq8", "ivf-pq")  # FAISS first stages (ann.py)
APPROXIMATE_KINDS = ("ivf-sq8", "ivf-pq")
FIRST_STAGE_KINDS = ("auto",) + INDEX_KINDS
NORMALIZE = ("none", "unit")  # what an index ranks by: For-Value as it is, or per unit of the row's ‖G‖
# storage tier of the re-rank data (`--rerank-store`, formerly `--rerank-dtype`): the hidden states kept in
# float32 (exact) or float16, or none at all ("recompute": the candidates' forward passes run again at query time
# from the texts the index keeps; exact, and ~100x less disk; docs/scaling.md "Storage tiers")
RERANK_STORES = ("float32", "float16", "recompute")
RERANK_DTYPES = RERANK_STORES  # the option's old name
RECOMPUTE = "recompute"
# percentiles (Index.percentiles) are exact on indexes of up to this many live rows (the hit's exact score among
# certified bounds of every row: 0.7 s for 2,048 rows on one CPU thread with the default model, docs/results.md);
# larger indexes count among a seeded sample of this many rows, with a 99% interval; the rows and the seed are in
# the manifest ("calibration"; an older manifest's larger sample is cut to this many)
CALIBRATION_ROWS = 2048


@dataclass(frozen=True)
class SketchConfig:
    """Shape of the first-stage sketch.

    Attributes:
        rank: r, principal directions of the hidden states kept.
        buckets: m, vocabulary buckets; the sketch has rank · buckets dims.
        dedicated: tokens given a bucket of their own (the heaviest in the fit sample); the rest of the
            vocabulary is hashed into the other buckets. Default: half the buckets.
        seed: seed of the hashing of the vocabulary tail.
        fit_samples: samples of the corpus used to fit P and R (the first ones of a seeded shuffle).
    """

    rank: int = 4
    buckets: int = 1024
    dedicated: int | None = None
    seed: int = 0
    fit_samples: int = 2000

    def __post_init__(self) -> None:
        if self.rank < 1 or self.buckets < 1 or self.fit_samples < 1:
            raise ConfigError("rank, buckets and fit_samples must be >= 1")
        if self.dedicated is not None and not 0 <= self.dedicated <= self.buckets:
            raise ConfigError(f"dedicated must be between 0 and buckets ({self.buckets}), got {self.dedicated}")

    @property
    def dim(self) -> int:
        return self.rank * self.buckets

    @property
    def n_dedicated(self) -> int:
        return self.buckets // 2 if self.dedicated is None else self.dedicated


@dataclass(frozen=True)
class FirstStageConfig:
    """How the first stage (candidate retrieval over sketches) is built.

    Attributes:
        kind: "auto" (flat-ip below approx_threshold rows, ivf-sq8 from it on) or one of INDEX_KINDS.
        approx_threshold: rows from which "auto" builds an approximate index.
        nlist: inverted lists of an IVF kind; 0 = about √n (at most n / 39, so k-means has 39 rows a list).
        pq_m: bytes per row of "ivf-pq" (must divide the sketch dimension).
        nprobe: lists searched per query; 0 = per direction the smallest reaching min_recall, at build time
            (with norm-ranged lists a fixed nprobe probes nprobe centroids' B lists each for "most" and
            B·nprobe lists for "least").
        refine: candidates taken from the codes per wanted row, re-scored exactly from the stored sketches.
        min_recall: the recall@k (most and least) below which an approximate build is refused.
        recall_k: k of the measured recall.
        recall_queries: training sketches used as held-out queries for the recall.
        train_rows: rows the IVF kinds are trained on; 0 = min(n, max(50·nlist, 10000)).
        seed: seed of the training and query samples (and of faiss's k-means).
        norm_buckets: B, norm buckets of the IVF kinds' lists (ann.ListOrder): each centroid's rows split
            by norm at the training sample's quantiles 1/2, 3/4, ... (the longest rows, where the
            smallest inner products lie, in the smallest buckets), so "least" probes few lists; 1 = plain
            lists ("least" then probes by the quantiser, about half the lists).
    """

    kind: str = "auto"
    approx_threshold: int = 1_000_000
    nlist: int = 0
    pq_m: int = 64
    nprobe: int = 0
    refine: int = 2
    min_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 200
    train_rows: int = 0
    seed: int = 0
    norm_buckets: int = 4

    def __post_init__(self) -> None:
        if self.kind not in FIRST_STAGE_KINDS:
            raise ConfigError(f"index kind must be one of {FIRST_STAGE_KINDS}, got {self.kind!r}")
        for name in ("approx_threshold", "pq_m", "refine", "recall_k", "recall_queries", "norm_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "nprobe", "train_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if self.nlist and self.nprobe > self.nlist:
            raise ConfigError(f"nprobe ({self.nprobe}) must be at most nlist ({self.nlist})")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ConfigError(f"min_recall must be between 0 and 1, got {self.min_recall}")


@dataclass(frozen=True)
class ScoreConfig:
    """How scores are computed.

    Attributes:
        method: "exact" (full vocabulary); "inbatch" (Algorithm 1 of the paper, as its official code
            does it: each batch of samples gets the vocabulary of the top-`inbatch_topk` predicted tokens
            at its scored positions, and a valuation batch meets a training batch on the intersection of
            their vocabularies; scores then depend on how samples are batched); "shared" (one fixed
            vocabulary for all: the target tokens of the training set); "emb" (the Emb baseline, α = 1:
            inner products of summed hidden states).
        strategy: "pairs", "gram" or "auto" (the cheaper by a flop count); the result is the same.
        memory_mb: working-memory budget for the blocks of one step.
        inbatch_size: samples per batch for method "inbatch" (valuation and training alike).
        inbatch_topk: predicted tokens per position that enter a batch's vocabulary for "inbatch".
        normalize: "none", or "unit" (method "exact" only): every training sample's value divided by its ‖G‖,
            as a unit-normalised index reports it (BuildConfig.normalize).
    """

    method: str = "exact"
    strategy: str = "auto"
    memory_mb: int = 1024
    inbatch_size: int = 32
    inbatch_topk: int = 5
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {list(NORMALIZE)}, got {self.normalize!r}")
        if self.normalize != "none" and self.method != "exact":
            raise ConfigError(f"normalize {self.normalize!r} needs method 'exact', got {self.method!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.memory_mb < 16:
            raise ConfigError(f"memory_mb must be >= 16, got {self.memory_mb}")
        if self.inbatch_size < 1 or self.inbatch_topk < 1:
            raise ConfigError("inbatch_size and inbatch_topk must be >= 1")


@dataclass(frozen=True)
class BuildConfig:
    """What an index build computes.

    Attributes:
        tokens: scored positions, "response" or "all" (see ForwardConfig).
        sketch: the first-stage sketch shape.
        shard_size: samples per shard (the unit of resumption).
        rerank_dtype: the storage tier of the re-rank data (the CLI's `--rerank-store`): "float32" (the hidden
            states, exact), "float16" (half the bytes; scores then differ from exact in the 3rd-4th digit) or
            "recompute" (no hidden states: only the scored tokens' ids; a query re-runs its candidates' forward
            passes from the stored texts, exact, paying that pass per candidate; `rerank_top` is then unused).
        max_length, batch_tokens, max_batch: as in ForwardConfig (`forward.auto_batch_tokens` sizes the last
            two to the device's memory).
        rerank_top: per training token, the largest next-token probabilities stored (with the norm of the
            rest) so that queries rule out candidates by certified bounds before exact scoring (rerank.py);
            0 = none (every candidate is scored exactly). 8 + 4/m bytes per token each.
        first_stage: which FAISS index retrieves the candidates (flat, or IVF above a size threshold) and
            the recall it must reach (firststage.py). Not part of the build key: changing it reuses the
            finished shards and rebuilds only the first stage.
        normalize: "none" (For-Value as the paper defines it) or "unit": every row's value is divided by its
            ‖G_i‖, i.e. rows are ranked by the cosine of their G with the query's (‖G_v‖ is the same for every
            row). The stored sketches are those of G_i / ‖G_i‖, so the first stage and the exact re-ranking
            rank alike. A memorised row of a fine-tuned model has π ≈ e_y and so G ≈ 0: raw values cannot see
            it, unit values can (docs/results.md, fact tracing).
        schema: how the corpus's rows became samples (format, field names, template, turns: formats.py); kept in
            the manifest ("data") so that index add, query, rank and eval --index read their files the same way.
    """

    tokens: str = "response"
    sketch: SketchConfig = field(default_factory=SketchConfig)
    shard_size: int = 1024
    rerank_dtype: str = "float32"
    max_length: int = 2048
    batch_tokens: int = 4096
    max_batch: int = CPU_MAX_BATCH
    rerank_top: int = 32
    normalize: str = "none"
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    schema: Schema = field(default_factory=Schema)

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_SCOPES:
            raise ConfigError(f"tokens must be one of {TOKEN_SCOPES}, got {self.tokens!r}")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.rerank_dtype not in RERANK_DTYPES:
            raise ConfigError(f"rerank_dtype must be one of {list(RERANK_STORES)} (--rerank-store), got "
                              f"{self.rerank_dtype!r}")
        if self.rerank_top < 0:
            raise ConfigError(f"rerank_top must be >= 0, got {self.rerank_top}")
        if self.normalize not in NORMALIZE:
            raise ConfigError(f"normalize must be one of {list(NORMALIZE)}, got {self.normalize!r}")

    @property
    def stores_states(self) -> bool:
        """The re-rank data holds the hidden states (False: the "recompute" tier)."""
        return self.rerank_dtype != RECOMPUTE


@dataclass(frozen=True)
class SyncConfig:
    """How `index sync` (sync.py) brings an index to a corpus, and when it advises a refit of the sketch maps.

    Attributes:
        min_recall: the sketch recall (recall@recall_k of the exact top-k within the sketch's top
            recall_candidates, on held-out rows of the new version) below which a refit is advised.
        max_changed: the share of the rows encoded since the maps were fit (by syncs; the rows the maps never
            saw) above which a refit is advised.
        refit: rebuild in full with new maps (a build of the corpus) instead of syncing.
        retries: times a sync that another update overtook (CURRENT moved) starts again from the new CURRENT
            before it fails (IndexChangedError).
        recall_k, recall_candidates: k of the recall, and the sketch candidates it is counted in (a tenth of
            the pool).
        recall_queries, recall_pool: held-out rows used as queries, and the rows they are scored against
            (exactly and by sketch); seeded by the sketch seed. 0 queries: not measured. Its cost is
            queries × pool exact scores: 16 × 1,024 took 70 s of a 170 s sync with SmolLM2-135M on a shared
            2-core CPU, so the defaults are 8 × 512 (a quarter of that).
    """

    min_recall: float = 0.9
    max_changed: float = 0.25
    refit: bool = False
    retries: int = 2
    recall_k: int = 10
    recall_candidates: int = 50
    recall_queries: int = 8
    recall_pool: int = 512

    def __post_init__(self) -> None:
        for name in ("min_recall", "max_changed"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("retries", "recall_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("recall_k", "recall_candidates", "recall_pool"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
