"""Index build → search on a tiny model, against exact For-Value over the whole corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer import build as build_mod
from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.data import Sample
from forvalue.indexer.errors import IndexCorruptError, IndexMismatchError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.model import LoadedModel, model_fingerprint, tokenizer_fingerprint
from forvalue.indexer.score import exact_scores
from forvalue.indexer.store import IndexRoot

from factories import make_model
from serving import corpus as serving_corpus

def corpus(n, seed=0):
    return serving_corpus(n, seed, max_words=5, meta=lambda i, w: {"source": ["a", "b"][i % 2]})


CFG = BuildConfig(tokens="response", sketch=SketchConfig(rank=8, buckets=64, fit_samples=50), shard_size=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("idx")
    samples = corpus(60)
    name = build_index(str(root), samples, lm, CFG)
    return root, samples, name


def exact_all(lm, queries, samples, tokens="response"):
    cfg = ForwardConfig(tokens=tokens)
    head = Head.from_model(lm.model)
    fq = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in queries], cfg, head)
    ft = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples], cfg, head)
    return exact_scores(fq, ft, head)


@pytest.mark.parametrize("direction", ["most", "least"])
def test_search_with_full_rerank_equals_exact(built, lm, direction):
    root, samples, _ = built
    idx = Index.open(str(root), lm)
    queries = corpus(3, seed=9)
    S = exact_all(lm, queries, samples)
    for j, q in enumerate(queries):
        res = idx.search([q], k=5, direction=direction, rerank=len(samples))
        order = torch.argsort(S[j], descending=direction == "most")[:5]
        assert [h.id for h in res.hits] == [samples[i].id for i in order.tolist()]
        np.testing.assert_allclose([h.score for h in res.hits], S[j][order].numpy(), rtol=1e-4, atol=1e-4)
        assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
        assert res.hits[0].metadata["prompt"] == samples[order[0]].prompt
        assert res.hits[0].metadata["meta"]["source"] in ("a", "b")


def test_group_query_is_mean(built, lm):
    root, samples, _ = built
    idx = Index.open(str(root), lm)
    queries = corpus(4, seed=5)
    S = exact_all(lm, queries, samples).mean(0)
    res = idx.search(queries, k=3, rerank=len(samples))
    assert [h.id for h in res.hits] == [samples[i].id for i in torch.argsort(S, descending=True)[:3].tolist()]
    f = idx.encode(queries)
    sk = idx.sketcher.sketch(f, idx._cpu_head)
    # linearity: the group's sketch score is the mean of the members' sketch scores
    X = torch.from_numpy(np.concatenate([np.asarray(a) for a in idx.version.shard_arrays("sketch")]))
    torch.testing.assert_close(sk.mean(0) @ X.T, (sk @ X.T).mean(0), rtol=1e-4, atol=1e-3)


def test_faiss_topk_equals_brute_force(built, lm):
    root, _, _ = built
    idx = Index.open(str(root), lm)
    f = idx.encode(corpus(2, seed=3))
    q = idx.sketcher.sketch(f, idx._cpu_head).numpy()
    X = np.concatenate([np.asarray(a) for a in idx.version.shard_arrays("sketch")])
    _, ids = idx.ann.search(q, 7, "most")
    ref = torch.topk(torch.from_numpy(q @ X.T), 7).indices.numpy()
    assert (ids == ref).all()


def test_score_all_is_exact(built, lm):
    root, samples, _ = built
    idx = Index.open(str(root), lm)
    queries = corpus(2, seed=4)
    got = idx.score_matrix(idx.encode(queries), block=7)
    torch.testing.assert_close(got, exact_all(lm, queries, samples), rtol=1e-4, atol=1e-4)


def test_manifest_records_build(built):
    root, samples, name = built
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


def test_other_model_refused(built):
    root, _, _ = built
    other = make_model(seed=1)
    from factories import make_tokenizer

    tok = make_tokenizer()
    lm2 = LoadedModel(other, tok, "other", model_fingerprint(other), tokenizer_fingerprint(tok))
    with pytest.raises(IndexMismatchError, match="built with model"):
        Index.open(str(root), lm2)


def test_altered_file_refused_previous_version_usable(tmp_path, lm):
    root = tmp_path / "idx"
    samples = corpus(20)
    v1 = build_index(str(root), samples, lm, CFG)
    v2 = build_index(str(root), samples[:10], lm, CFG)
    target = root / "versions" / v2 / "shards" / "000000" / "sketch.npy"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="sketch.npy"):
        Index.open(str(root), lm)
    idx = Index.open(str(root), lm, version=v1)
    assert idx.search(corpus(1, seed=8), k=2).hits


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


def test_add_rejects_existing_ids(tmp_path, lm):
    from forvalue.indexer.errors import DataError

    root = tmp_path / "idx"
    samples = corpus(12)
    build_index(str(root), samples, lm, CFG)
    with pytest.raises(DataError, match="s3"):
        build_index(str(root), [samples[3]], lm, CFG, base=IndexRoot(str(root)).load())
    assert IndexRoot(str(root)).load().n == 12


def test_storage_summary(built):
    from forvalue.indexer.build import storage_summary

    root, samples, name = built
    m = IndexRoot(str(root)).load(name).manifest
    st = storage_summary(m)
    # the sketch is dim · 4 bytes per sample plus the .npy headers, stored once
    assert 4 * m["sketch"]["dim"] <= st["first_stage_bytes_per_sample"] < 4 * m["sketch"]["dim"] + 128
    assert st["rerank_bytes_per_sample"] > 0 and st["total_bytes"] == sum(f["bytes"] for f in m["files"].values())
