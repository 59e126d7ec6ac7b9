"""forvalue.indexer.ann against simple references: torch.topk(q @ Xᵀ) for search, q @ Xᵀ for the scans."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from forvalue.indexer.ann import (  # noqa: E402
    GPU_K_CAP, SketchIndex, faiss_available, faiss_version, gpu_available, set_threads,
)
from forvalue.indexer.errors import ConfigError, IndexCorruptError  # noqa: E402



@functools.lru_cache(maxsize=None)
def sketches(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows (n, dim) float32: inner products are continuous, so exact ties do not happen."""
    return np.random.default_rng([seed, n, dim]).standard_normal((n, dim), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def queries(dim: int, q: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng([seed, q, dim]).standard_normal((q, dim), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def cpu_index(n: int, dim: int) -> SketchIndex:
    """Shared read-only CPU index over sketches(n, dim); tests that mutate build their own."""
    return SketchIndex.from_array(sketches(n, dim), use_gpu=False)


def reference_topk(q: np.ndarray, x: np.ndarray, k: int, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """torch.topk of q @ Xᵀ (most) or of −(q @ Xᵀ) (least, scores negated back), k clamped to n."""
    s = torch.from_numpy(q) @ torch.from_numpy(x).T
    k = min(k, x.shape[0])
    if direction == "most":
        values, ids = torch.topk(s, k, dim=1)
        return values.numpy(), ids.numpy()
    values, ids = torch.topk(-s, k, dim=1)
    return (-values).numpy(), ids.numpy()


def assert_same_topk(scores, ids, ref_scores, ref_ids, tol: float) -> None:
    """Scores agree within tol; ids agree wherever the reference order is not decided by a near-tie."""
    assert scores.shape == ref_scores.shape and ids.shape == ref_ids.shape
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=tol)
    for row in range(ids.shape[0]):
        s = ref_scores[row].astype(np.float64)
        gap_prev = np.r_[np.inf, np.abs(np.diff(s))]
        gap_next = np.r_[np.abs(np.diff(s)), np.inf]
        clear = (gap_prev > 2 * tol) & (gap_next > 2 * tol)
        np.testing.assert_array_equal(ids[row][clear], ref_ids[row][clear])
        # Every id whose score clears the k-th one by a margin must be in the result, wherever placed.
        kth = s[-1]
        sure = ref_ids[row][np.abs(s - kth) > 2 * tol]
        assert set(sure.tolist()) <= set(ids[row].tolist())
        assert len(set(ids[row].tolist())) == ids.shape[1]


def tol_for(dim: int) -> float:
    return 1e-5 * dim  # float32 sums of dim products of N(0, 1) numbers, in a different order


# --------------------------------------------------------------------------------------------------
# Search against torch.topk.


@pytest.mark.parametrize("n", [1, 1000])
@pytest.mark.parametrize("dim", [8, 4096])
@pytest.mark.parametrize("k", ["1", "10", "n", "n+7"])
@pytest.mark.parametrize("direction", ["most", "least"])
def test_search_matches_torch_topk(n, dim, k, direction):
    k = {"1": 1, "10": 10, "n": n, "n+7": n + 7}[k]
    x, q = sketches(n, dim), queries(dim)
    scores, ids = cpu_index(n, dim).search(q, k, direction)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (q.shape[0], min(k, n))
    ref_scores, ref_ids = reference_topk(q, x, k, direction)
    assert_same_topk(scores, ids, ref_scores, ref_ids, tol_for(dim))
    # Scores are the true inner products of the returned rows, in the promised order.
    true = np.einsum("qd,qkd->qk", q.astype(np.float64), x[ids].astype(np.float64))
    np.testing.assert_allclose(scores, true, rtol=0, atol=tol_for(dim))
    step = np.diff(scores, axis=1)
    assert (step <= 0).all() if direction == "most" else (step >= 0).all()


def test_least_is_most_of_negated_query():
    q = queries(64)
    index = cpu_index(1000, 64)
    s_least, i_least = index.search(q, 25, "least")
    s_most, i_most = index.search(-q, 25, "most")
    np.testing.assert_array_equal(i_least, i_most)
    np.testing.assert_array_equal(s_least, -s_most)


def test_float64_and_single_row_queries():
    q = queries(64)
    index = cpu_index(1000, 64)
    s32, i32 = index.search(q, 5)
    s64, i64 = index.search(q.astype(np.float64), 5)
    np.testing.assert_array_equal(i32, i64)
    s1, i1 = index.search(q[:1], 5)
    np.testing.assert_array_equal(i1, i32[:1])


def test_empty_index_and_empty_queries():
    index = SketchIndex(16, use_gpu=False)
    assert (index.ntotal, index.dim, index.kind, index.device) == (0, 16, "flat-ip", "cpu")
    scores, ids = index.search(queries(16), 5)
    assert scores.shape == ids.shape == (3, 0)
    scores, ids = cpu_index(1000, 8).search(np.empty((0, 8), np.float32), 5)
    assert scores.shape == ids.shape == (0, 5)
    assert index.all_scores(queries(16)[0]).shape == (0,)


# --------------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 7), np.float32), "7 dims"),
        (np.zeros(8, np.float32), "2-D"),
        (np.zeros((1, 2, 8), np.float32), "2-D"),
        (np.array([[np.nan] * 8], np.float32), "NaN"),
        (np.array([[0.0] * 7 + [np.inf]], np.float32), "NaN or infinity"),
        (np.full((1, 8), 1e300), "NaN or infinity"),  # overflows float32
        (np.array([["a"] * 8]), "real numbers"),
        (np.ones((1, 8), np.complex64), "real numbers"),
    ],
)
def test_bad_queries_raise(bad, match):
    index = cpu_index(1000, 8)
    with pytest.raises(ValueError, match=match):
        index.search(bad, 3)
    with pytest.raises(ValueError, match=match):
        index.inner_products(bad, [0])


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3", None])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match="k must be"):
        cpu_index(1000, 8).search(queries(8), k)


def test_bad_direction_raises():
    with pytest.raises(ValueError, match="direction"):
        cpu_index(1000, 8).search(queries(8), 3, "top")


def test_bad_construction_and_add():
    with pytest.raises(ConfigError):
        SketchIndex(0)
    with pytest.raises(ConfigError, match="kind"):
        SketchIndex(8, kind="hnsw")
    index = SketchIndex(8, use_gpu=False)
    with pytest.raises(ValueError, match="dims"):
        index.add(np.zeros((3, 9), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        index.add(np.zeros(8, np.float32))
    rows = np.zeros((4, 8), np.float32)
    rows[2, 5] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        index.add(rows)
    assert index.ntotal == 0


@pytest.mark.skipif(gpu_available(), reason="checks the error raised without a GPU")
def test_use_gpu_without_gpu_raises():
    with pytest.raises(ConfigError, match="no GPU"):
        SketchIndex(8, use_gpu=True)


# --------------------------------------------------------------------------------------------------
# Building.


def test_incremental_add_equals_one_shot():
    x, q = sketches(1000, 256), queries(256)
    one_shot = SketchIndex.from_array(x, use_gpu=False)
    chunked = SketchIndex(256, use_gpu=False)
    for start in range(0, 1000, 300):  # 300, 300, 300, 100
        chunked.add(x[start : start + 300])
    chunked.add(x[:0])
    built = SketchIndex.build((x[s : s + 128] for s in range(0, 1000, 128)), dim=256, use_gpu=False)
    for index in (chunked, built):
        assert index.ntotal == 1000
        for direction in ("most", "least"):
            expected = one_shot.search(q, 50, direction)
            got = index.search(q, 50, direction)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])


# --------------------------------------------------------------------------------------------------
# Exact scans.


def test_all_scores_from_faiss_and_from_memmap(tmp_path):
    x, q = sketches(1000, 64), queries(64)
    index = SketchIndex.from_array(x, use_gpu=False)
    ref = q.astype(np.float64) @ x.T.astype(np.float64)
    from_faiss = index.all_scores(q, chunk_rows=300)
    np.testing.assert_allclose(from_faiss, ref, rtol=0, atol=tol_for(64))
    assert from_faiss.shape == (3, 1000) and from_faiss.dtype == np.float32
    np.save(tmp_path / "x.npy", x)
    index.attach_vectors(np.load(tmp_path / "x.npy", mmap_mode="r"))
    one = index.all_scores(q[1], chunk_rows=333)
    assert one.shape == (1000,)
    np.testing.assert_allclose(one, ref[1], rtol=0, atol=tol_for(64))
    np.testing.assert_allclose(index.all_scores(q), from_faiss, rtol=0, atol=tol_for(64))


def test_inner_products_from_faiss_and_from_vectors():
    x, q = sketches(1000, 64), queries(64)
    index = SketchIndex.from_array(x, use_gpu=False)
    ids = np.array([999, 0, 17, 17, 512])
    ref = q.astype(np.float64) @ x[ids].T.astype(np.float64)
    np.testing.assert_allclose(index.inner_products(q, ids), ref, rtol=0, atol=tol_for(64))
    index.attach_vectors(x)
    np.testing.assert_allclose(index.inner_products(q, ids), ref, rtol=0, atol=tol_for(64))
    assert index.inner_products(q, np.array([], np.int64)).shape == (3, 0)
    for bad in ([1000], [-1], [[0, 1]], [0.5]):
        with pytest.raises(ValueError, match="ids"):
            index.inner_products(q, bad)


def test_attached_vectors_shape_checked():
    x = sketches(1000, 64)
    index = SketchIndex.from_array(x[:10], use_gpu=False)
    with pytest.raises(ValueError, match="shape"):
        index.attach_vectors(x)
    index.attach_vectors(x[:10])
    index.add(x[10:12])  # now stale: caught at use
    with pytest.raises(ValueError, match="shape"):
        index.all_scores(queries(64)[0])


@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("direction", ["most", "least"])
def test_gpu_k_cap_fallback_is_exact(attach, direction):
    """The chunked exact scan used above the GPU k cap, forced on CPU with a tiny cap."""
    x, q = sketches(1000, 64), queries(64)
    index = SketchIndex.from_array(x, use_gpu=False)
    if attach:
        index.attach_vectors(x)
    index.chunk_rows = 97  # many uneven chunks, so the running merge is exercised
    expected = {k: index.search(q, k, direction) for k in (10, 300, 1000)}
    index._k_cap = 5
    for k, (ref_scores, ref_ids) in expected.items():
        scores, ids = index.search(q, k, direction)
        assert scores.dtype == np.float32 and ids.dtype == np.int64
        assert_same_topk(scores, ids, ref_scores, ref_ids, tol_for(64))


# --------------------------------------------------------------------------------------------------
# Persistence.


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, mmap):
    q = queries(64)
    index = cpu_index(1000, 64)
    path = tmp_path / "sketch.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sketch.faiss"]
    loaded = SketchIndex.load(path, use_gpu=False, mmap=mmap)
    assert (loaded.ntotal, loaded.dim, loaded.kind, loaded.device) == (1000, 64, "flat-ip", "cpu")
    for direction in ("most", "least"):
        a, b = index.search(q, 20, direction), loaded.search(q, 20, direction)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    if mmap:
        # faiss aborts the process on add to a mapped index; we refuse it first.
        with pytest.raises(ValueError, match="read-only"):
            loaded.add(sketches(1000, 64)[:1])
        index.save(path)  # replacing the file leaves the mapped index valid
        np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])
    else:
        loaded.add(sketches(1000, 64)[:1])
        assert loaded.ntotal == 1001


def test_bytes_round_trip():
    q = queries(64)
    index = cpu_index(1000, 64)
    data = index.to_bytes()
    assert isinstance(data, bytes)
    restored = SketchIndex.from_bytes(data, use_gpu=False)
    for direction in ("most", "least"):
        a, b = index.search(q, 20, direction), restored.search(q, 20, direction)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    restored.add(sketches(1000, 64)[:2])
    assert restored.ntotal == 1002


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        SketchIndex.load(tmp_path / "missing.faiss")
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"not an index" * 10)
    with pytest.raises(IndexCorruptError, match="garbage.faiss"):
        SketchIndex.load(garbage, use_gpu=False)
    good = tmp_path / "good.faiss"
    cpu_index(1000, 64).save(good)
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[:5000])
    for mmap in (False, True):
        with pytest.raises(IndexCorruptError, match="truncated.faiss"):
            SketchIndex.load(truncated, use_gpu=False, mmap=mmap)
    l2 = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexFlatL2(8), str(l2))
    with pytest.raises(IndexCorruptError, match="IndexFlatL2"):
        SketchIndex.load(l2, use_gpu=False)
    with pytest.raises(IndexCorruptError):
        SketchIndex.from_bytes(b"\x00" * 3, use_gpu=False)


# --------------------------------------------------------------------------------------------------
# Environment.


def test_versions_and_threads():
    assert faiss_available()
    assert faiss_version() == faiss.__version__
    previous = set_threads(1)
    try:
        assert faiss.omp_get_max_threads() == 1
    finally:
        set_threads(previous)
    assert faiss.omp_get_max_threads() == previous
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError):
            set_threads(bad)


def test_concurrent_searches_match_sequential():
    index, q = cpu_index(1000, 256), queries(256, q=8)
    expected = [index.search(q[i : i + 1], 20, d) for i in range(8) for d in ("most", "least")]
    got: list = [None] * len(expected)

    def work(j: int) -> None:
        for _ in range(5):
            got[j] = index.search(q[j // 2 : j // 2 + 1], 20, ("most", "least")[j % 2])

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(expected))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (a_s, a_i), (b_s, b_i) in zip(expected, got):
        np.testing.assert_array_equal(a_s, b_s)
        np.testing.assert_array_equal(a_i, b_i)


IMPORT_CHECK = """
import numpy as np
{first}
{second}
x = np.random.default_rng(0).standard_normal((200, 16), dtype=np.float32)
index = faiss.IndexFlatIP(16)
index.add(x)
_, ids = index.search(x[:2], 3)
ref = torch.topk(torch.from_numpy(x[:2]) @ torch.from_numpy(x).T, 3).indices.numpy()
assert (ids == ref).all(), (ids, ref)
print("ok", torch.__version__, faiss.__version__)
"""


@pytest.mark.parametrize("order", [("torch", "faiss"), ("faiss", "torch")])
def test_torch_and_faiss_import_in_either_order(order):
    code = IMPORT_CHECK.format(first=f"import {order[0]}", second=f"import {order[1]}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


# --------------------------------------------------------------------------------------------------
# GPU (skipped without faiss-gpu and CUDA).


@pytest.mark.gpu(faiss=True)
@pytest.mark.parametrize("direction", ["most", "least"])
def test_gpu_matches_cpu(tmp_path, direction):
    n, dim = GPU_K_CAP + 1000, 64
    x, q = sketches(n, dim), queries(dim)
    cpu = SketchIndex.from_array(x, use_gpu=False)
    gpu = SketchIndex.from_array(x, use_gpu=True)
    assert gpu.device.startswith("cuda") and gpu.ntotal == n
    for k in (1, 100, GPU_K_CAP, GPU_K_CAP + 1, n + 5):  # above the cap: the CPU fallback
        assert_same_topk(*gpu.search(q, k, direction), *cpu.search(q, k, direction), tol_for(dim))
    np.testing.assert_allclose(gpu.all_scores(q), cpu.all_scores(q), rtol=0, atol=tol_for(dim))
    gpu.save(tmp_path / "g.faiss")
    back = SketchIndex.load(tmp_path / "g.faiss", use_gpu=False)
    np.testing.assert_array_equal(back.search(q, 10)[1], cpu.search(q, 10)[1])
    again = SketchIndex.from_bytes(cpu.to_bytes(), use_gpu=True)
    assert again.device.startswith("cuda")
    assert_same_topk(*again.search(q, 10, direction), *cpu.search(q, 10, direction), tol_for(dim))


@pytest.mark.parametrize("k, rows", [(1, 7), (5, 3), (10, 50), (300, 64)])
def test_chunked_topk_equals_a_full_sort(k, rows):
    """ann.chunked_topk (the exact scan over row chunks the first stage and tools use) against argsort."""
    from forvalue.indexer.ann import chunked_topk

    rng = np.random.default_rng(k)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x[17] = x[3]  # a tie: the lower id goes first
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, ids = chunked_topk(q, ((a, x[a : a + rows]) for a in range(0, len(x), rows)), k)
    full = q @ x.T
    kk = min(k, len(x))
    for i in range(3):
        want = np.lexsort((np.arange(len(x)), -full[i]))[:kk]
        np.testing.assert_array_equal(ids[i][:kk], want)
        np.testing.assert_allclose(scores[i][:kk], full[i][want], rtol=1e-6)
