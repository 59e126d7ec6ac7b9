"""Distributed-build plumbing without Ray: ShardWriter, Build.refresh and build_index's write_shards hook."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.store import IndexRoot, ShardWriter


def _rows(n, start=0):
    return [{"id": f"r{start + j}"} for j in range(n)]


def _write(build_dir, i):
    """A 'worker': another process writing shard i into the open build."""
    ShardWriter(build_dir).write_shard(i, {"x": np.full((2, 3), i, np.float32)}, _rows(2, 2 * i))


def test_workers_write_shards_the_driver_publishes(tmp_path):
    root = IndexRoot(tmp_path)
    build = root.open_build("k1")
    build.write_shard(0, {"x": np.zeros((2, 3), np.float32)}, _rows(2))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(str(build.path), i)) for i in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert build.done_shards() == [0]  # not seen until refreshed
    assert build.refresh() == [0, 1, 2]
    late = ShardWriter(build.path)
    name = root.publish(build, {})
    v = root.load(name)
    np.testing.assert_array_equal(v.array("x")[:, 0], [0, 0, 1, 1, 2, 2])
    assert [r["id"] for r in v.rows(np.arange(6))] == [f"r{j}" for j in range(6)]
    with pytest.raises(ConfigError, match="gone"):  # a late worker after the publish changes nothing
        late.write_shard(3, {"x": np.zeros((2, 3), np.float32)}, _rows(2))
    assert root.load(name).n == 6


def test_shard_writer_needs_an_open_build(tmp_path):
    with pytest.raises(ConfigError, match="not an open build"):
        ShardWriter(tmp_path / "builds" / "nothing")


def test_build_index_write_shards_hook_and_its_fallback(tmp_path, served_lm):
    """The hook gets the missing shards once the maps are saved; what it leaves undone the driver writes."""
    from forvalue.indexer.build import build_index, encode_shard
    from forvalue.indexer.sketch import MAP_FILES, Sketcher
    from forvalue.indexer.config import BuildConfig, SketchConfig
    from forvalue.indexer.features import Head

    from serving import corpus

    cfg = BuildConfig(sketch=SketchConfig(rank=4, buckets=32, fit_samples=12), shard_size=4)
    samples = corpus(12)
    seen = []

    def hook(build, todo, norms):
        assert all(build.has_file(n) for n in MAP_FILES)
        seen.extend(i for i, _ in todo)
        sk = Sketcher.from_arrays({n: build.read_array(n) for n in MAP_FILES}, cfg.sketch.buckets)
        i, chunk = todo[0]  # write one shard as a worker would, leave the others
        arrays, tokens, offsets, rows = encode_shard(served_lm, Head.from_model(served_lm.model), sk, chunk, cfg,
                                                     norms=norms)
        ShardWriter(build.path).write_shard(i, arrays, rows, token_arrays=tokens, offsets=offsets)

    name = build_index(str(tmp_path / "a"), samples, served_lm, cfg, write_shards=hook)
    assert seen == [0, 1, 2]
    ref = build_index(str(tmp_path / "b"), samples, served_lm, cfg)
    got, want = IndexRoot(tmp_path / "a").load(name), IndexRoot(tmp_path / "b").load(ref)
    assert got.rows(np.arange(12)) == want.rows(np.arange(12))
    np.testing.assert_allclose(got.array("sketch"), want.array("sketch"), rtol=1e-4, atol=1e-5)
