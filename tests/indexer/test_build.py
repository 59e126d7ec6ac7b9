"""Index builds (indexer/build.py): the manifest, resuming after a crash, adding to an index, storage summary."""

from __future__ import annotations

import numpy as np
import pytest

from forvalue.indexer import build as build_mod
from forvalue.indexer.build import build_index
from forvalue.indexer.data import Sample
from forvalue.indexer.index import Index
from forvalue.indexer.store import IndexRoot

from indexes import CFG, plain_corpus as corpus


def test_manifest_records_build(built60):
    root, samples, name = built60
    v = IndexRoot(str(root)).load(name)
    m = v.manifest
    assert m["n_samples"] == len(samples) == v.n
    assert m["tokens"] == "response" and m["sketch"]["dim"] == 8 * 64
    assert m["index"]["kind"] == "flat-ip" and m["index"]["ntotal"] == len(samples)
    assert m["model"]["fingerprint"] and m["files"]


def test_resume_after_crash_equals_clean_build(tmp_path, lm, monkeypatch):
    samples = corpus(50, seed=2)
    clean = tmp_path / "clean"
    build_index(str(clean), samples, lm, CFG)
    crashed = tmp_path / "crashed"
    real = build_mod.encode_shard
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(crashed), samples, lm, CFG)
    monkeypatch.setattr(build_mod, "encode_shard", real)
    resumed_calls = {"n": 0}

    def counting(*a, **kw):
        resumed_calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "encode_shard", counting)
    build_index(str(crashed), samples, lm, CFG)
    assert resumed_calls["n"] == 2  # shards 0 and 1 were kept, 2 and 3 computed
    a, b = IndexRoot(str(clean)).load(), IndexRoot(str(crashed)).load()
    assert a.n == b.n == 50
    assert [r["id"] for r in a.rows(np.arange(50))] == [r["id"] for r in b.rows(np.arange(50))]
    # equal to float tolerance: the clean build reuses the fit pass's features, batched differently
    np.testing.assert_allclose(a.array("sketch"), b.array("sketch"), rtol=1e-4, atol=1e-4)
    ta, tb = a.token_rows(np.arange(50)), b.token_rows(np.arange(50))
    np.testing.assert_allclose(ta["h"], tb["h"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(ta["y"], tb["y"])
    np.testing.assert_array_equal(ta["offsets"], tb["offsets"])


def test_add_appends_with_same_maps(tmp_path, lm):
    root = tmp_path / "idx"
    base_samples = corpus(30)
    build_index(str(root), base_samples, lm, CFG)
    r = IndexRoot(str(root))
    base = r.load()
    new = [Sample(id=f"n{i}", prompt=s.prompt, response=s.response) for i, s in enumerate(corpus(10, seed=7))]
    name = build_index(str(root), new, lm, CFG, base=base)
    v = r.load(name)
    assert v.n == 40
    np.testing.assert_array_equal(v.global_array("projection.npy"), base.global_array("projection.npy"))
    idx = Index.open(str(root), lm)
    res = idx.search([new[0]], k=1, rerank=40)
    assert res.hits[0].id == "n0"  # a sample is its own most valuable training sample here


def test_add_skips_rows_it_holds_and_rejects_existing_ids_with_other_content(tmp_path, lm):
    import dataclasses

    from forvalue.indexer.errors import DataError

    root = tmp_path / "idx"
    samples = corpus(12)
    build_index(str(root), samples, lm, CFG)
    changed = dataclasses.replace(samples[3], response=samples[3].response + " more")
    with pytest.raises(DataError, match="'s3' is already in index version v000001 with other content"):
        build_index(str(root), [changed], lm, CFG, base=IndexRoot(str(root)).load())
    assert IndexRoot(str(root)).load().n == 12
    # the same row again: nothing to add, no new version
    assert build_index(str(root), [samples[3]], lm, CFG, base=IndexRoot(str(root)).load()) == "v000001"
    new = corpus(14)[12:]
    name = build_index(str(root), [samples[3]] + new, lm, CFG, base=IndexRoot(str(root)).load())
    assert (name, IndexRoot(str(root)).load().n) == ("v000002", 14)


def test_storage_summary(built60):
    from forvalue.indexer.build import storage_summary

    root, samples, name = built60
    m = IndexRoot(str(root)).load(name).manifest
    st = storage_summary(m)
    # the sketch is dim · 4 bytes per sample plus the .npy headers, stored once
    assert 4 * m["sketch"]["dim"] <= st["first_stage_bytes_per_sample"] < 4 * m["sketch"]["dim"] + 128
    assert st["rerank_bytes_per_sample"] > 0 and st["total_bytes"] == sum(f["bytes"] for f in m["files"].values())


def test_background_writer_writes_in_order_and_raises_a_failed_write(tmp_path, monkeypatch):
    """build.BackgroundWriter (one shard in flight on its own thread) against writing the shards directly."""
    import numpy as np

    from forvalue.indexer.build import BackgroundWriter

    root = IndexRoot(tmp_path / "idx")
    build = root.open_build("k1")
    writer = BackgroundWriter(build)
    for i in range(3):
        writer.submit(i, {"x": np.full((2, 1), i, dtype=np.float32)}, [{"id": f"r{i}a"}, {"id": f"r{i}b"}], None,
                      None)
    writer.close()
    assert build.done_shards() == [0, 1, 2]
    assert build.read_shard_array(2, "x").tolist() == [[2.0], [2.0]]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(build, "write_shard", broken)
    writer = BackgroundWriter(build)
    writer.submit(3, {"x": np.zeros((1, 1), dtype=np.float32)}, [{"id": "r3"}], None, None)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    build.close()
