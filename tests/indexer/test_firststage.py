"""The approximate first stage (IVF-SQ8 / IVF-PQ), IndexShards and the build-time recall, against flat search."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from forvalue.indexer.ann import ConcatRows, SketchIndex  # noqa: E402
from forvalue.indexer.config import FirstStageConfig
from forvalue.indexer.errors import ConfigError, RecallTooLowError  # noqa: E402
from forvalue.indexer.firststage import (
    auto_nlist, build_first_stage, choose_kind, drop_self, flat_truth, list_sizes, recall_at_k, sample_rows,
)


@functools.lru_cache(maxsize=None)
def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows around 16 centres with log-normal norms (some rows much longer than others), float32."""
    rng = np.random.default_rng([seed, n, dim])
    centres = rng.standard_normal((16, dim)).astype(np.float32)
    x = centres[rng.integers(0, 16, n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x * np.exp(0.4 * rng.standard_normal((n, 1)))).astype(np.float32)


def queries(dim: int, q: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng([seed, dim]).standard_normal((q, dim)).astype(np.float32)


def torch_topk(q: np.ndarray, x: np.ndarray, k: int, direction: str) -> tuple[np.ndarray, np.ndarray]:
    s = torch.from_numpy(q) @ torch.from_numpy(x).T
    values, ids = torch.topk(s if direction == "most" else -s, min(k, x.shape[0]), dim=1)
    return (values if direction == "most" else -values).numpy(), ids.numpy()


@functools.lru_cache(maxsize=None)
def _trained(kind: str, n: int, dim: int, nlist: int, pq_m: int) -> SketchIndex:
    return SketchIndex.from_array(clustered(n, dim), kind=kind, use_gpu=False, nlist=nlist, pq_m=pq_m)


def ivf(kind: str, x: np.ndarray, nlist: int = 16, pq_m: int = 16, attach: bool = True) -> SketchIndex:
    """A trained IVF index over x = clustered(n, dim) (cached: PQ training takes seconds; callers set nprobe)."""
    assert x is clustered(*x.shape)
    index = _trained(kind, *x.shape, nlist, pq_m)
    index.vectors = None
    if attach:
        index.attach_vectors(x)
    return index


# --------------------------------------------------------------------------------------------------
# The IVF kinds against torch.topk.


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq"])
@pytest.mark.parametrize("direction", ["most", "least"])
def test_ivf_probing_every_list_and_refining_equals_flat(kind, direction):
    x, q = clustered(3000, 32), queries(32)
    index = ivf(kind, x)
    assert (index.kind, index.nlist, index.ntotal) == (kind, 16, 3000)
    index.nprobe = 16  # every list: only the codes' error is left, and the exact refinement removes it
    index.refine = 20
    scores, ids = index.search(q, 10, direction)
    ref_scores, ref_ids = torch_topk(q, x, 10, direction)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-3)


def test_ivf_scores_are_exact_with_vectors_and_approximate_without():
    x, q = clustered(3000, 32), queries(32)
    index = ivf("ivf-sq8", x)
    index.nprobe = 4
    s, ids = index.search(q, 10)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[ids]), rtol=1e-5, atol=1e-4)
    s2, ids2 = ivf("ivf-sq8", x, attach=False).search(q, 10)
    assert np.abs(s2 - np.einsum("qd,qkd->qk", q, x[ids2])).max() > 1e-4  # 8-bit codes are not exact
    assert (np.diff(s2, axis=1) <= 0).all()


def test_ivf_missing_rows_are_padded_at_the_end():
    x = clustered(3000, 32)
    index = ivf("ivf-sq8", x, nlist=64)
    index.nprobe = 1
    scores, ids = index.search(queries(32), 2000, "least")
    assert ids.shape == (5, 2000) and (ids == -1).any()
    for row_s, row_i in zip(scores, ids):
        missing = row_i == -1
        assert not missing[: np.argmax(missing)].any() and missing[np.argmax(missing):].all()
        assert np.isposinf(row_s[missing]).all() and (np.diff(row_s[~missing]) >= 0).all()


def test_ivf_needs_training_and_enough_rows():
    index = SketchIndex(32, kind="ivf-sq8", use_gpu=False, nlist=8)
    assert not index.is_trained
    with pytest.raises(ValueError, match="trained"):
        index.add(clustered(100, 32))
    with pytest.raises(ConfigError, match="lists"):
        index.train(clustered(100, 32)[:5])
    with pytest.raises(ConfigError, match="256 training rows"):
        SketchIndex(32, kind="ivf-pq", use_gpu=False, nlist=2, pq_m=8).train(clustered(100, 32))
    with pytest.raises(ConfigError, match="divide"):
        SketchIndex(30, kind="ivf-pq", use_gpu=False, pq_m=8)
    with pytest.raises(ConfigError, match="nprobe"):
        ivf("ivf-sq8", clustered(3000, 32)).nprobe = 17
    with pytest.raises(ConfigError, match="nprobe"):
        SketchIndex(8, use_gpu=False).nprobe = 1


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq"])
def test_ivf_save_load_keeps_kind_and_nprobe(tmp_path, kind):
    x, q = clustered(3000, 32), queries(32)
    index = ivf(kind, x, attach=False)
    index.nprobe = 5
    index.save(tmp_path / "ix.faiss")
    loaded = SketchIndex.load(tmp_path / "ix.faiss", use_gpu=False)
    assert (loaded.kind, loaded.nlist, loaded.nprobe, loaded.ntotal) == (kind, 16, 5, 3000)
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "ix2.faiss", "wb") as f:
        index.write(f)
    assert (tmp_path / "ix2.faiss").read_bytes() == (tmp_path / "ix.faiss").read_bytes()


@pytest.mark.parametrize("shards", [1, 2])
def test_nprobe_per_direction_equals_setting_it(shards):
    x, q = clustered(3000, 32), queries(32)
    index = SketchIndex.from_array(x, kind="ivf-sq8", use_gpu=False, nlist=16)
    index.nprobe = 2
    index.set_direction_nprobe(least=9)
    index.shard(shards)
    ref = ivf("ivf-sq8", x, attach=False)
    for direction, nprobe in (("most", 2), ("least", 9)):
        ref.nprobe = nprobe
        for a, b in zip(index.search(q, 20, direction), ref.search(q, 20, direction)):
            np.testing.assert_array_equal(a, b)
    assert index.nprobe == 2 and index.direction_nprobe == {"least": 9}  # the index's own setting is kept
    # the share of rows scanned: the probed lists' rows, summed over the shards
    assert index.probed_share(q, "least") == pytest.approx(ref.probed_share(q, "least"))
    assert 0 < index.probed_share(q, "most") < index.probed_share(q, "least") < 1
    with pytest.raises(ConfigError, match="least"):
        index.set_direction_nprobe(least=17)


# --------------------------------------------------------------------------------------------------
# IndexShards: the same results as one index.


@pytest.mark.parametrize("kind", ["flat-ip", "ivf-sq8"])
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("direction", ["most", "least"])
def test_sharded_index_equals_one_index(kind, parts, direction):
    x, q = clustered(3000, 32), queries(32)
    one = SketchIndex.from_array(x, kind=kind, use_gpu=False, nlist=16)
    sharded = SketchIndex.from_array(x, kind=kind, use_gpu=False, nlist=16)
    if kind != "flat-ip":
        one.nprobe = 4
        sharded.nprobe = 4
    sharded.shard(parts)
    assert (sharded.shards, sharded.ntotal, sharded.kind) == (parts, 3000, kind)
    assert sharded.nprobe == one.nprobe
    for k in (1, 10, 3000):
        s1, i1 = one.search(q, k, direction)
        s2, i2 = sharded.search(q, k, direction)
        np.testing.assert_array_equal(i2, i1)
        np.testing.assert_array_equal(s2, s1)
    if kind == "flat-ip":  # the exact scans read the rows back from the sub-indexes
        np.testing.assert_allclose(sharded.all_scores(q), q @ x.T, rtol=1e-5, atol=1e-4)
        ids = np.array([2999, 0, 1500, 1499, 1000, 7])
        np.testing.assert_allclose(sharded.inner_products(q, ids), q @ x[ids].T, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="read-only"):
        sharded.add(x[:1])
    with pytest.raises(ValueError, match="sharded"):
        sharded.to_bytes()


def test_more_shards_than_rows():
    x, q = clustered(3000, 32)[:2], queries(32)
    sharded = SketchIndex.from_array(x, use_gpu=False)
    sharded.shard(4)
    s, ids = sharded.search(q, 5)
    ref_s, ref_i = torch_topk(q, x, 5, "most")
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=1e-6)


def test_concat_rows_reads_like_one_array():
    x = clustered(3000, 32)
    cat = ConcatRows([x[:1000], x[1000:1001], x[1001:]])
    assert cat.shape == x.shape and len(cat) == 3000
    np.testing.assert_array_equal(cat[10:2000], x[10:2000])
    ids = np.array([2999, 0, 1000, 1000, 1001, 5, 4])
    np.testing.assert_array_equal(cat[ids], x[ids])
    np.testing.assert_array_equal(cat[2990:5000], x[2990:])
    with pytest.raises(IndexError):
        cat[np.array([3000])]


# --------------------------------------------------------------------------------------------------
# Recall at build time.


def test_recall_at_k_and_drop_self():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, 6, 7, -1]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert recall_at_k(truth, truth) == 1.0
    ids = np.array([[7, 3, 1], [4, 5, 6]])
    np.testing.assert_array_equal(drop_self(ids, np.array([3, 9]), 2), [[7, 1], [4, 5]])


def test_flat_truth_is_torch_topk_without_the_query_row():
    x = clustered(3000, 32)
    rows = sample_rows(3000, 20, 0)
    truth = flat_truth(x, rows, 10, chunk_rows=700)
    for direction in ("most", "least"):
        _, ref = torch_topk(x[rows], x, 11, direction)
        np.testing.assert_array_equal(truth[direction], drop_self(ref, rows, 10))
        assert not (truth[direction] == rows[:, None]).any()


def test_kind_choice_and_auto_nlist():
    cfg = FirstStageConfig(approx_threshold=1000)
    assert choose_kind(999, cfg) == "flat-ip" and choose_kind(1000, cfg) == "ivf-sq8"
    assert choose_kind(10, FirstStageConfig(kind="ivf-pq")) == "ivf-pq"
    assert auto_nlist(1_000_000) == 1000 and auto_nlist(100) == 2 and auto_nlist(5) == 1
    with pytest.raises(ConfigError, match="kind"):
        FirstStageConfig(kind="hnsw")
    with pytest.raises(ConfigError, match="min_recall"):
        FirstStageConfig(min_recall=1.5)


def test_flat_below_the_threshold_builds_nothing():
    index, info = build_first_stage(clustered(3000, 32), FirstStageConfig(approx_threshold=3001))
    assert index is None and info["kind"] == "flat-ip" and not info["stored"]


@pytest.mark.parametrize("buckets", [1, 4])
def test_build_chooses_the_smallest_nprobe_reaching_the_recall(buckets):
    x = clustered(3000, 32)
    cfg = FirstStageConfig(approx_threshold=1000, nlist=32, min_recall=0.9, recall_queries=50, refine=1,
                           norm_buckets=buckets)
    index, info = build_first_stage(x, cfg, use_gpu=False)
    assert info["kind"] == "ivf-sq8" and info["stored"] and info["nlist"] == 32 and index.nprobe == info["nprobe"]
    assert index.nlist == 32 * buckets and info.get("norm_buckets", 1) == buckets
    curve = info["recall"]["by_nprobe"]
    ladders = {"most": [1, 2, 4, 8, 16, 32],
               "least": [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128] if buckets > 1 else [1, 2, 4, 8, 16, 32]}
    for direction in ("most", "least"):  # each direction: its ladder up to the first rung reaching the recall
        steps = [c for c in curve if direction in c]
        assert [c["nprobe"] for c in steps] == ladders[direction][: len(steps)]
        assert all(c[direction] < 0.9 for c in steps[:-1]) and steps[-1][direction] >= 0.9
        assert info["nprobe_by_direction"][direction] == steps[-1]["nprobe"] == index.direction_nprobe[direction]
        assert info["recall"][direction] == steps[-1][direction]
        assert info["recall"]["scanned_share"][direction] == steps[-1]["scanned_share"]
        assert all(a["scanned_share"] <= b["scanned_share"] for a, b in zip(steps, steps[1:]))
    # the published recall and share are what an independent count gives (torch.topk, the query row left out;
    # the rows of the probed lists counted from the lists' members)
    rows = sample_rows(3000, 50, cfg.seed + 1)
    members = np.concatenate([np.full(n, i) for i, n in enumerate(list_sizes(index))])[
        np.argsort(np.concatenate([faiss_list_ids(index, i) for i in range(index.nlist)]))]
    for direction in ("most", "least"):
        _, ref = torch_topk(x[rows], x, 11, direction)
        _, got = index.search(x[rows], 11, direction)
        assert info["recall"][direction] == pytest.approx(
            recall_at_k(drop_self(got, rows, 10), drop_self(ref, rows, 10)), abs=1e-4)
        assert info["recall"]["scanned_share"][direction] == pytest.approx(
            np.mean([np.isin(members, probed_lists(index, x[r], direction)).mean() for r in rows]), abs=1e-4)


def faiss_list_ids(index, i):
    """The row ids stored in inverted list i of a CPU IVF index."""
    import faiss

    ivf = index._ivf()[0]
    n = ivf.invlists.list_size(i)
    return faiss.rev_swig_ptr(ivf.invlists.get_ids(i), n).copy() if n else np.empty(0, dtype=np.int64)


def probed_lists(index, q, direction):
    """The lists a search of the one query q probes (plain IVF: the quantiser's nprobe best)."""
    q = (-q if direction == "least" else q)[None].astype(np.float32)
    if index.list_order is not None:
        return index.list_order.probe(q, direction, index._probe_count(direction))[0][0]
    return index._ivf()[0].quantizer.search(q, index.direction_nprobe.get(direction, index.nprobe))[1][0]


@pytest.mark.parametrize("kind", ["ivf-sq8", "ivf-pq"])
def test_norm_ranged_lists_at_full_probing_answer_like_exact_search(kind):
    x, q = clustered(3000, 32), queries(32, q=8)
    cfg = FirstStageConfig(kind=kind, nlist=16, nprobe=16, refine=8, min_recall=0.0, recall_queries=20, pq_m=8)
    index, info = build_first_stage(x, cfg, use_gpu=False)
    assert info["norm_buckets"] == 4 and index.direction_nprobe == {"most": 16, "least": 64}
    assert sorted(np.concatenate([faiss_list_ids(index, i) for i in range(64)]).tolist()) == list(range(3000))
    assert info["recall"]["scanned_share"] == {"most": 1.0, "least": 1.0}
    for direction in ("most", "least"):
        ref_s, ref = torch_topk(q, x, 10, direction)
        s, ids = index.search(q, 10, direction)
        np.testing.assert_array_equal(ids, ref)
        np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-3)


def test_norm_ranged_most_scans_the_rows_of_plain_lists():
    """"most" over norm-ranged lists probes every bucket of the plain IVF's nprobe centroids: the same answers."""
    x, q = clustered(3000, 32), queries(32, q=20)
    common = dict(kind="ivf-sq8", nlist=16, nprobe=2, refine=2, min_recall=0.0, recall_queries=20)
    plain, _ = build_first_stage(x, FirstStageConfig(norm_buckets=1, **common), use_gpu=False)
    ranged, info = build_first_stage(x, FirstStageConfig(norm_buckets=4, **common), use_gpu=False)
    assert plain.list_order is None and ranged.list_order is not None
    for a, b in zip(plain.search(q, 10, "most"), ranged.search(q, 10, "most")):
        np.testing.assert_array_equal(a, b)
    # every row keeps its plain list: list b·nlist + j holds rows of plain list j, the norms ordered by b
    norms = np.linalg.norm(x, axis=1)
    edges = [-np.inf, *info["norm_edges"], np.inf]
    for j in range(16):
        rows = np.sort(np.concatenate([faiss_list_ids(ranged, b * 16 + j) for b in range(4)]))
        np.testing.assert_array_equal(rows, np.sort(faiss_list_ids(plain, j)))
        for b in range(4):
            got = norms[faiss_list_ids(ranged, b * 16 + j)]
            assert ((got >= edges[b] * (1 - 1e-6)) & (got <= edges[b + 1] * (1 + 1e-6))).all()


def test_norm_ranged_least_scans_fewer_rows_than_plain_lists():
    """On long-tailed norms the least direction reaches the recall with a smaller share than plain lists."""
    x = clustered(6000, 32)
    common = dict(kind="ivf-sq8", nlist=32, refine=2, min_recall=0.9, recall_queries=60)
    _, plain = build_first_stage(x, FirstStageConfig(norm_buckets=1, **common), use_gpu=False)
    _, ranged = build_first_stage(x, FirstStageConfig(norm_buckets=4, **common), use_gpu=False)
    assert min(plain["recall"]["least"], ranged["recall"]["least"]) >= 0.9
    assert ranged["recall"]["scanned_share"]["least"] < plain["recall"]["scanned_share"]["least"]


def test_build_below_the_recall_is_refused():
    with pytest.raises(RecallTooLowError, match="--min-recall"):
        build_first_stage(clustered(3000, 32), FirstStageConfig(kind="ivf-pq", nlist=32, nprobe=1, pq_m=4,
                                                                refine=1, min_recall=0.99), use_gpu=False)


# --------------------------------------------------------------------------------------------------
# Through build_index and Index (the tiny model): manifest, stored file, same answers as flat.


def _build(root, lm, samples, **first_stage):
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig, SketchConfig

    cfg = BuildConfig(sketch=SketchConfig(rank=4, buckets=32, fit_samples=36), shard_size=16,
                      first_stage=FirstStageConfig(**first_stage))
    return build_index(str(root), samples, lm, cfg)


def test_build_index_with_an_ivf_first_stage_answers_like_flat(tmp_path, served_lm):
    from forvalue.indexer.index import Index
    from forvalue.indexer.store import IndexRoot

    from serving import corpus

    samples = corpus(36)
    _build(tmp_path / "flat", served_lm, samples)
    # nprobe = nlist: every row is a candidate, so the answers must be the exact ones
    _build(tmp_path / "ivf", served_lm, samples, approx_threshold=10, nlist=2, nprobe=2, min_recall=0.0)
    m = IndexRoot(tmp_path / "ivf").load().manifest
    info = m["index"]
    assert info["kind"] == "ivf-sq8" and info["stored"] and info["file"] == "index.faiss" and info["nlist"] == 2
    assert "index.faiss" in m["files"] and info["nprobe_by_direction"] == {"most": 2, "least": 8}
    assert info["recall"]["most"] == info["recall"]["least"] == 1.0 and info["norm_buckets"] == 4
    assert info["recall"]["scanned_share"] == {"most": 1.0, "least": 1.0}  # published per direction
    assert len(info["list_order"]["scale"]) == len(info["list_order"]["spread"]) == 8
    # people see the per-list numbers counted (index info, the server's Info), the manifest file keeps them
    import json

    from click.testing import CliRunner

    from forvalue.client.cli import main
    from forvalue.indexer.results import index_info

    shown = json.loads(CliRunner().invoke(main, ["index", "info", "--index", str(tmp_path / "ivf")]).stdout)
    assert shown["index"]["list_order"] == "8 lists: scale and spread per list (in the manifest file)"
    assert index_info(m, "v")["manifest"]["index"]["list_order"] == shown["index"]["list_order"]
    assert shown["index"]["recall"] == info["recall"]
    assert info["recall"]["k"] == 10 and info["recall"]["queries"] == 36
    assert IndexRoot(tmp_path / "flat").load().manifest["index"]["kind"] == "flat-ip"
    flat, ivf_index = Index.open(str(tmp_path / "flat"), served_lm), Index.open(str(tmp_path / "ivf"), served_lm)
    assert ivf_index.ann.kind == "ivf-sq8" and ivf_index.ann.nprobe == info["nprobe"]
    query = [("Reverse: red cat ->", " cat red")]
    for direction in ("most", "least"):
        a = flat.search(query, k=5, direction=direction, rerank=36)  # every row a candidate: exact answers
        b = ivf_index.search(query, k=5, direction=direction, rerank=36)
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-6)


def test_a_refused_build_keeps_its_shards_and_reruns_only_the_first_stage(tmp_path, served_lm, monkeypatch):
    import forvalue.indexer.build as build_mod
    from forvalue.indexer.store import IndexRoot

    from serving import corpus

    samples = corpus(36)
    with pytest.raises(RecallTooLowError, match="below the required 1.0"):
        _build(tmp_path, served_lm, samples, approx_threshold=10, nlist=8, nprobe=1, refine=1, min_recall=1.0)
    assert IndexRoot(tmp_path).current() is None
    monkeypatch.setattr(build_mod, "encode_shard", lambda *a, **k: pytest.fail("a finished shard was recomputed"))
    name = _build(tmp_path, served_lm, samples, approx_threshold=10, nlist=8, min_recall=0.0)
    assert IndexRoot(tmp_path).load(name).manifest["index"]["kind"] == "ivf-sq8"


def test_cli_index_kind_and_a_refused_build(tmp_path, served_model_dir):
    """forvalue index build --index-kind ...: the manifest's first stage; a build below --min-recall is exit 2."""
    import json

    from click.testing import CliRunner

    from forvalue.client.cli import main
    from forvalue.indexer.data import write_jsonl

    from serving import corpus

    data = tmp_path / "train.jsonl"
    write_jsonl(data, corpus(36))
    common = ["index", "build", "--data", str(data), "--model", served_model_dir, "--dim", "128", "--rank", "4",
              "--fit-samples", "36", "--shard-size", "12", "--no-progress", "--json", "--index-kind", "ivf-sq8", "--nlist", "8"]
    refused = CliRunner().invoke(main, common + ["--index", str(tmp_path / "a"), "--nprobe", "1", "--refine", "1",
                                                 "--min-recall", "1.0"])
    assert refused.exit_code == 2 and "below the required 1.0" in refused.output
    ok = CliRunner().invoke(main, common + ["--index", str(tmp_path / "b"), "--min-recall", "0.5"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["index"]["kind"] == "ivf-sq8" and summary["index"]["recall"]["min_recall"] == 0.5
    assert min(summary["index"]["recall"]["most"], summary["index"]["recall"]["least"]) >= 0.5


@pytest.mark.gpu(faiss=True, count=2)
@pytest.mark.parametrize("kind", ["flat-ip", "ivf-sq8"])
def test_sharded_over_gpus_equals_one_cpu_index(kind):
    x, q = clustered(3000, 32), queries(32)
    cpu = SketchIndex.from_array(x, kind=kind, use_gpu=False, nlist=16)
    gpus = SketchIndex.from_array(x, kind=kind, use_gpu=True, nlist=16)
    if kind != "flat-ip":
        cpu.nprobe = gpus.nprobe = 16
    gpus.shard()
    assert gpus.shards == faiss.get_num_gpus()
    for direction in ("most", "least"):
        s1, i1 = cpu.search(q, 10, direction)
        s2, i2 = gpus.search(q, 10, direction)
        np.testing.assert_array_equal(i2, i1)
        np.testing.assert_allclose(s2, s1, rtol=1e-4, atol=1e-3)


def test_norm_ranged_lists_reopen_from_the_manifest(tmp_path):
    """open_first_stage rebuilds the list order from the manifest's fields: the same answers after a reload."""
    import json

    from forvalue.indexer.errors import IndexCorruptError
    from forvalue.indexer.firststage import open_first_stage

    x, q = clustered(3000, 32), queries(32, q=10)
    cfg = FirstStageConfig(kind="ivf-sq8", nlist=16, min_recall=0.9, recall_queries=30)
    index, info = build_first_stage(x, cfg, use_gpu=False)
    index.save(tmp_path / "index.faiss")
    info = json.loads(json.dumps(info))  # as the manifest stores it
    loaded = open_first_stage(info, [x[:1000], x[1000:]], 32, tmp_path / "index.faiss", use_gpu=False)
    assert loaded.list_order is not None and loaded.direction_nprobe == info["nprobe_by_direction"]
    for direction in ("most", "least"):
        for a, b in zip(index.search(q, 10, direction), loaded.search(q, 10, direction)):
            np.testing.assert_array_equal(a, b)
    bad = {**info, "list_order": {"scale": info["list_order"]["scale"][:-1], "spread": info["list_order"]["spread"]}}
    with pytest.raises(IndexCorruptError, match="scales"):
        open_first_stage(bad, [x], 32, tmp_path / "index.faiss", use_gpu=False)


def test_norm_ranged_lists_sharded_probe_plainly():
    """A sharded index cannot follow the list order: "most" scans the same rows, "least" every list (exact)."""
    x, q = clustered(3000, 32), queries(32, q=10)
    cfg = FirstStageConfig(kind="ivf-sq8", nlist=16, nprobe=2, refine=8, min_recall=0.0, recall_queries=20)
    one, _ = build_first_stage(x, cfg, use_gpu=False)
    sharded, _ = build_first_stage(x, cfg, use_gpu=False)
    sharded.shard(2)
    for a, b in zip(one.search(q, 10, "most"), sharded.search(q, 10, "most")):
        np.testing.assert_array_equal(a, b)
    _, ref = torch_topk(q, x, 10, "least")
    np.testing.assert_array_equal(sharded.search(q, 10, "least")[1], ref)
    assert one.probed_share(q, "least") < 1.0
