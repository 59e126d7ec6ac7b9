"""The indexer tests' small corpora, their build config and brute-force references (shared by the test
modules of index, build, filters, deletion and answers; the built indexes are fixtures in indexer/conftest.py)."""

from __future__ import annotations

from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.filters import Where

from serving import corpus as serving_corpus

SOURCES = ["gsm8k", "mmlu", "web"]
LICENSES = ["mit", "cc-by", "apache"]

CFG = BuildConfig(tokens="response", sketch=SketchConfig(rank=8, buckets=64, fit_samples=50), shard_size=16)


def top_probability_config(n: int) -> BuildConfig:
    """Every token scored, top-8 probabilities stored (certified bounds), for an index of n samples: the pruned
    re-ranking and certified-answer tests."""
    return BuildConfig(tokens="all", sketch=SketchConfig(rank=4, buckets=32, fit_samples=n), shard_size=16,
                       rerank_top=8)


def plain_corpus(n, seed=0):
    """n samples with a source a/b."""
    return serving_corpus(n, seed, max_words=5, meta=lambda i, w: {"source": ["a", "b"][i % 2]})


def _meta(i, words):
    meta = {"source": SOURCES[i % 3 if i % 7 else 0], "license": LICENSES[(i // 2) % 3], "year": 2020 + i % 4}
    if i % 11 == 5:
        del meta["license"]  # some rows lack a field
    return meta


def meta_corpus(n, seed=0, prefix="s"):
    """n samples with a source, a license (missing in some rows) and a year to filter and group by."""
    return serving_corpus(n, seed, prefix, max_words=5, meta=_meta)


def matching(samples, where: Where):
    return [i for i, s in enumerate(samples) if where.matches({"id": s.id, "label": s.label, "meta": s.meta})]


def brute_topk(S_row, allowed, k, direction):
    vals = [(float(S_row[i]), i) for i in allowed]
    vals.sort(key=lambda t: (-t[0], t[1]) if direction == "most" else (t[0], t[1]))
    return [i for _, i in vals[:k]]
