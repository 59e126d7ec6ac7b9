"""The torch-free config classes (indexer/config.py): defaults are valid, derived sizes, and each bad field
is refused by a ConfigError that names it (also through dataclasses.replace)."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from forvalue.indexer.config import BuildConfig, FirstStageConfig, ScoreConfig, SketchConfig
from forvalue.indexer.errors import ConfigError


def test_defaults_are_valid_and_sketch_sizes():
    assert BuildConfig().sketch == SketchConfig() and BuildConfig().first_stage == FirstStageConfig()
    ScoreConfig()
    s = SketchConfig(rank=3, buckets=10)
    assert s.dim == 30 and s.n_dedicated == 5
    assert SketchConfig(rank=3, buckets=10, dedicated=0).n_dedicated == 0


BAD = [
    (SketchConfig, dict(rank=0), "rank, buckets and fit_samples"),
    (SketchConfig, dict(fit_samples=0), "rank, buckets and fit_samples"),
    (SketchConfig, dict(buckets=8, dedicated=9), "dedicated must be between 0 and buckets"),
    (FirstStageConfig, dict(kind="hnsw"), "index kind must be one of"),
    (FirstStageConfig, dict(refine=0), "refine must be >= 1"),
    (FirstStageConfig, dict(nprobe=-1), "nprobe must be >= 0"),
    (FirstStageConfig, dict(nlist=4, nprobe=8), r"nprobe \(8\) must be at most nlist \(4\)"),
    (FirstStageConfig, dict(min_recall=1.5), "min_recall must be between 0 and 1"),
    (ScoreConfig, dict(method="gradient"), "method must be one of"),
    (ScoreConfig, dict(strategy="fast"), "strategy must be one of"),
    (ScoreConfig, dict(memory_mb=8), "memory_mb must be >= 16"),
    (ScoreConfig, dict(inbatch_topk=0), "inbatch_size and inbatch_topk"),
    (BuildConfig, dict(tokens="prompt"), "tokens must be one of"),
    (BuildConfig, dict(shard_size=0), "shard_size must be >= 1"),
    (BuildConfig, dict(rerank_dtype="int8"), "rerank_dtype must be one of"),
    (BuildConfig, dict(rerank_top=-1), "rerank_top must be >= 0"),
]


@pytest.mark.parametrize("cls,kw,match", BAD, ids=[f"{c.__name__}-{next(iter(kw))}" for c, kw, _ in BAD])
def test_bad_field_is_a_config_error_naming_it(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)
    with pytest.raises(ConfigError, match=match):  # replace validates again
        dataclasses.replace(cls(), **kw)
    assert isinstance(ConfigError("x"), ValueError)


def test_config_module_is_torch_free():
    """The CLI takes its option defaults from here: importing it must not need torch."""
    import subprocess

    code = "import sys, forvalue.indexer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
