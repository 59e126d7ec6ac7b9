"""First-stage candidate retrieval: a thin wrapper over FAISS inner-product search of sketch vectors.

Each training sample i has a float32 sketch s_i (D,) with <s_v, s_i> ≈ S(v, i). For a query sketch q,

    most:  the k rows with the largest  <q, s_i>, scores descending;
    least: the k rows with the smallest <q, s_i>, scores ascending (searched as the largest <−q, s_i>,
           scores negated back, so every returned score is the true inner product).

Exact re-ranking of the candidates happens elsewhere. Ids are row numbers 0..n−1 in the order rows were
added (no `add_with_ids`: GpuIndexFlat does not support it).

Kinds: "flat-ip" (IndexFlatIP, exact), and two approximate ones for large corpora, "ivf-sq8" (an
inverted file of `nlist` lists with 8-bit scalar-quantised codes, D bytes a row) and "ivf-pq" (product-
quantised codes, `pq_m` bytes a row). The approximate kinds need `train` on a sample before `add`, search
`nprobe` of their lists per query, and, being approximate, have their recall measured against flat search
(firststage.py; IVF with inner product uses normalised centroids and can miss large-norm rows; "least"
probes few lists only with norm-ranged lists, `ListOrder`). Their
search takes `refine`·k candidates from the codes and, with `vectors` attached, keeps the k with the
largest exact inner products (so returned scores are exact); without vectors the scores are the codes'
approximations.

Sharding: `shards` > 1 splits the rows over sub-indexes searched together (faiss IndexShards; the
per-shard top-k are merged, so results equal one index): one per GPU when several GPUs are used,
CPU sub-indexes otherwise (the tested path).

Devices: a GPU is used when faiss sees one (faiss-gpu), the CPU otherwise. GPU search caps k at
`GPU_K_CAP` = 2048; a larger k is answered by an exact chunked scan on the CPU over the stored vectors
(the attached array when there is one, else vectors reconstructed from the index) — correct, slower.

Threads: faiss releases the GIL during search. Concurrent `search` calls on a CPU index that nobody is
adding to are safe and run in parallel (each uses up to `set_threads(n)` OpenMP threads, so a server
with many request threads should call `set_threads(1)` or a small n). `add` must not run concurrently
with anything else on the same index. GPU resources are not thread-safe, so GPU calls are serialised
by a lock.

FAISS is an optional dependency (`forvalue[cpu]` / `forvalue[gpu]`): this module imports without it
and raises ImportError, saying what to install, only when an index is made. Nothing is ever pickled;
FAISS files carry no checksum, so the store's manifest must.
"""

from __future__ import annotations

import numbers
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .config import APPROXIMATE_KINDS as APPROXIMATE, INDEX_KINDS as KINDS
from .errors import ConfigError, IndexCorruptError
from .files import write_atomic
from .results import DIRECTIONS

GPU_K_CAP = 2048  # faiss GPU k-selection limit (GPU_MAX_SELECTION_K)
CHUNK_BYTES = 64 << 20  # rows read per step of a chunked scan: ~64 MiB of float32 vectors


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "the sketch index needs FAISS: pip install 'forvalue[cpu]' (faiss-cpu) or 'forvalue[gpu]'"
        ) from exc
    return faiss


def faiss_available() -> bool:
    """Whether `import faiss` works."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def gpu_available() -> bool:
    """Whether faiss is importable, built with GPU support and sees at least one GPU."""
    if not faiss_available():
        return False
    faiss = _import_faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def gpu_count() -> int:
    """GPUs faiss sees (0 without faiss-gpu)."""
    return _import_faiss().get_num_gpus() if gpu_available() else 0


def faiss_version() -> str:
    """faiss.__version__ (for the index manifest)."""
    return str(_import_faiss().__version__)


def set_threads(n: int) -> int:
    """Set the number of OpenMP threads faiss uses per call; returns the previous setting."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"thread count must be an integer >= 1, got {n!r}")
    faiss = _import_faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    return previous


# --------------------------------------------------------------------------------------------------
# Kinds: how to make an empty index, and how to recognise a loaded one.


def _make_flat_ip(faiss, dim: int, nlist: int, pq_m: int):
    return faiss.IndexFlatIP(dim)


def _make_ivf_sq8(faiss, dim: int, nlist: int, pq_m: int):
    return faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)


def _make_ivf_pq(faiss, dim: int, nlist: int, pq_m: int):
    if dim % pq_m:
        raise ConfigError(f"pq_m ({pq_m}) must divide the sketch dimension ({dim})")
    # "np": no polysemous training (a code reordering for Hamming filtering, unused here and slow)
    return faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}np", faiss.METRIC_INNER_PRODUCT)


_FACTORIES = {"flat-ip": _make_flat_ip, "ivf-sq8": _make_ivf_sq8, "ivf-pq": _make_ivf_pq}
_EXACT = {"flat-ip"}  # kinds whose search equals the chunked exact scan (the GPU k > cap fallback)


def _kind_of(faiss, index) -> str | None:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        kinds = {_kind_of(faiss, index.at(i)) for i in range(index.count())}
        return kinds.pop() if len(kinds) == 1 else None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    if isinstance(index, faiss.IndexFlat):
        return "flat-ip"
    if isinstance(index, faiss.IndexIVFScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
        return "ivf-sq8"
    if isinstance(index, faiss.IndexIVFPQ) and index.pq.nbits == 8:
        return "ivf-pq"
    return None


def _ivf_parts(faiss, index) -> list:
    """The IndexIVF objects inside `index` (itself, or each shard of an IndexShards); [] for flat."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        return [p for i in range(index.count()) for p in _ivf_parts(faiss, index.at(i))]
    ivf = faiss.try_extract_index_ivf(index)
    return [] if ivf is None else [ivf]


def _shard_cpu(faiss, cpu_index, parts: int):
    """`cpu_index` split into `parts` contiguous row ranges, as an IndexShards whose ids are the row numbers.

    Flat: sub-index j holds rows [a_j, b_j) with local ids (successive_ids adds a_j back). IVF: each
    sub-index is an empty clone of the trained index given the rows' entries of every list
    (`copy_subset_to`), global ids kept. Searches run one sub-index after the other (not threaded: a
    server searches from several threads at once; each sub-search uses faiss's OpenMP threads).
    """
    n = int(cpu_index.ntotal)
    bounds = [n * j // parts for j in range(parts + 1)]
    ivf = faiss.try_extract_index_ivf(cpu_index)
    shards = faiss.IndexShards(cpu_index.d, False, ivf is None)
    keep = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if ivf is None:
            sub = faiss.IndexFlatIP(cpu_index.d)
            if b > a:
                sub.add(cpu_index.reconstruct_n(a, b - a))
        else:
            sub = faiss.clone_index(cpu_index)
            sub.reset()
            ivf.copy_subset_to(faiss.extract_index_ivf(sub), 0, a, b)
        shards.add_shard(sub)
        keep.append(sub)
    shards.referenced_objects = keep  # the IndexShards only borrows its sub-indexes
    shards.syncWithSubIndexes()
    return shards


# --------------------------------------------------------------------------------------------------
# Input checks.


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    """`x` as a C-contiguous finite float32 (rows, dim) array (copied only when it has to be)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise ValueError(f"{what} must be real numbers, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, {dim}), got shape {a.shape}; use x[None, :] for one row")
    if a.shape[1] != dim:
        raise ValueError(f"{what} have {a.shape[1]} dims, the index has {dim}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        bad = int(np.flatnonzero(~np.isfinite(a).all(axis=1))[0])
        raise ValueError(f"{what} contain NaN or infinity (first in row {bad}, after conversion to float32)")
    return a


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_direction(direction: Any) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def _check_ids(ids: Any, n: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and (a.dtype.kind not in "iu" or a.dtype == np.bool_)):
        raise ValueError(f"ids must be a 1-D integer array, got shape {a.shape} and dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"ids must lie in [0, {n}), got values in [{a.min()}, {a.max()}]")
    return a


# --------------------------------------------------------------------------------------------------
# Exact chunked scan (pure numpy): the GPU k > cap fallback.


def chunked_topk(
    queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k largest <q, x_i> per query over row chunks (start, X[start:start + r]), largest first.

    Ties go to the lower id. Returns (scores (q, k) float32, ids (q, k) int64).
    """
    q = queries.shape[0]
    best_s = np.empty((q, 0), dtype=np.float32)
    best_i = np.empty((q, 0), dtype=np.int64)
    for start, block in chunks:
        s = queries @ block.T  # (q, r)
        ids = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64), s.shape)
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, ids], axis=1)
        if cat_s.shape[1] > k:
            keep = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
            cat_s = np.take_along_axis(cat_s, keep, axis=1)
            cat_i = np.take_along_axis(cat_i, keep, axis=1)
        best_s, best_i = cat_s, cat_i
    order = np.lexsort((best_i, -best_s), axis=-1)
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


# --------------------------------------------------------------------------------------------------
# Rows of several arrays as one (the shards' memory-mapped sketches, attached to an index).


class ConcatRows:
    """The rows of several (n_j, D) arrays (e.g. one np.memmap per store shard) read as one (n, D) array.

    Supports what `SketchIndex` reads: `shape`, `dtype`, `len`, slices with step 1 (`x[a:b]`) and 1-D
    integer arrays of rows (`x[ids]`, any order, repeats allowed). Nothing is copied until read.
    """

    def __init__(self, parts: Iterable[Any]):
        self.parts = [np.asarray(p) if not hasattr(p, "shape") else p for p in parts]
        if not self.parts:
            raise ValueError("ConcatRows needs at least one array")
        dims = {tuple(p.shape[1:]) for p in self.parts}
        if len(dims) != 1 or any(len(p.shape) != 2 for p in self.parts):
            raise ValueError(f"ConcatRows needs 2-D arrays of one width, got shapes {[p.shape for p in self.parts]}")
        self.starts = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), int(self.parts[0].shape[1]))
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            a, b, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("ConcatRows slices take step 1")
            key = np.arange(a, max(a, b), dtype=np.int64)
        ids = np.asarray(key, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"ConcatRows takes a slice or a 1-D array of rows, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"rows must lie in [0, {self.shape[0]})")
        out = np.empty((ids.size, self.shape[1]), dtype=self.dtype)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        for j in np.unique(part):
            pos = np.flatnonzero(part == j)
            local = ids[pos] - self.starts[j]
            if local.size and local[-1] - local[0] == local.size - 1 and (np.diff(local) == 1).all():
                out[pos] = self.parts[j][int(local[0]) : int(local[-1]) + 1]  # a run: one contiguous read
            else:
                out[pos] = self.parts[j][local]
        return out


# --------------------------------------------------------------------------------------------------
# Norm-ranged lists: which lists a query probes, per direction.


class ListOrder:
    """The probe order of an IVF index whose lists are split by row norm ("norm-ranged lists").

    The index has L = B·nlist lists: list b·nlist + j holds the rows of norm bucket b (0 = shortest) whose
    largest inner product among the nlist centroids is with c_j (the assignment of a plain IVF). Its
    quantiser holds c_j once per bucket, so a plain faiss search probing B·p lists scans every bucket of
    the p best centroids: the rows a plain IVF of nlist lists scans at nprobe p.

    "most" probes every bucket of the `nprobe` centroids with the largest <q, c_j> (the plain IVF's rows).
    "least" (searched as the largest <q', x> with q' = −q) probes the `nprobe` lists with the largest

        est_L(q') = r_L · (α_L <q', ĉ_j> + ‖q'‖ · √((1 − α_L²) / D) · √(2 ln max(n_L, 2))),

    an estimate of the list's largest inner product: r_L is its largest row norm, α_L the mean cosine of
    its rows with ĉ_j = c_j / ‖c_j‖, and n_L its rows. A row's direction is α_L ĉ_j plus a residual of
    squared length 1 − α_L² on average; spread over D dimensions, its projection on q' is like
    N(0, ‖q'‖² (1 − α_L²) / D), and the largest of n_L of them about √(2 ln n_L) standard deviations. The
    rows with the smallest inner products are long rows pointing a little away from q, spread over every
    centroid's region: splitting the lists by norm lets a query skip the short rows of those regions.

    Args:
        centroids: (nlist, D) the distinct centroids c_j.
        buckets: B.
        scale: (L,) r_L · α_L.
        spread: (L,) r_L · √((1 − α_L²) / D) · √(2 ln max(n_L, 2)).
        sizes: (L,) rows per list (empty lists are never probed).
    """

    def __init__(self, centroids: Any, buckets: int, scale: Any, spread: Any, sizes: Any):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.buckets = int(buckets)
        self.nlist = int(self.centroids.shape[0])
        lists = self.nlist * self.buckets
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        self.spread = np.asarray(spread, dtype=np.float32).reshape(-1)
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if not (self.scale.size == self.spread.size == self.sizes.size == lists):
            raise IndexCorruptError(f"norm-ranged lists: {self.nlist} centroids x {self.buckets} buckets = {lists} "
                                    f"lists, but {self.scale.size} scales, {self.spread.size} spreads and "
                                    f"{self.sizes.size} list sizes; rebuild the index")
        norms = np.linalg.norm(self.centroids, axis=1, keepdims=True)
        self.unit = self.centroids / np.maximum(norms, np.float32(1e-30))
        self.ntotal = int(self.sizes.sum())

    def probe(self, q: np.ndarray, direction: str, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The lists to scan for the searched queries q (m, D) (q' = −q for "least", as `search` passes it).

        Returns:
            (lists (m, p) int64, −1 for an empty list, and their centroids' inner products <q, c_j> (m, p)
            float32, which faiss adds to the residual codes' scores); p = B·nprobe ("most") or nprobe.
        """
        s = q @ self.centroids.T  # (m, nlist)
        if direction == "most":
            top = np.argsort(-s, axis=1, kind="stable")[:, : min(nprobe, self.nlist)]
            lists = (top[:, None, :] + self.nlist * np.arange(self.buckets)[None, :, None]).reshape(q.shape[0], -1)
        else:
            est = np.tile(q @ self.unit.T, (1, self.buckets)) * self.scale
            est += np.linalg.norm(q, axis=1, keepdims=True) * self.spread
            est[:, self.sizes == 0] = -np.inf
            p = min(nprobe, est.shape[1])
            top = np.argpartition(-est, p - 1, axis=1)[:, :p] if p < est.shape[1] else np.tile(
                np.arange(est.shape[1]), (q.shape[0], 1))
            lists = top.astype(np.int64)
        coarse = np.take_along_axis(s, lists % self.nlist, axis=1).astype(np.float32)
        lists = np.where(self.sizes[lists] > 0, lists, -1).astype(np.int64)
        return lists, coarse

    def share(self, lists: np.ndarray) -> float:
        """The mean share of all rows that the probed `lists` (m, p) hold (−1: none)."""
        if self.ntotal == 0 or lists.size == 0:
            return 0.0
        rows = np.where(lists >= 0, self.sizes[np.maximum(lists, 0)], 0).sum(axis=1)
        return float(rows.mean() / self.ntotal)


# --------------------------------------------------------------------------------------------------


class SketchIndex:
    """Inner-product search over n sketch vectors (n, D), ids = row numbers.

    Make one empty and `add` chunks (a build never holds all vectors twice: only the index and the
    current chunk), or use `from_array` / `build`; reopen one with `load` / `from_bytes`.

    Args:
        dim: D, the sketch dimension.
        kind: index type, one of KINDS: "flat-ip" (exact IndexFlatIP), "ivf-sq8" or "ivf-pq" (approximate;
            `train` before `add`).
        use_gpu: True = GPU (ConfigError if faiss sees none), False = CPU, None = GPU when available.
        nlist: inverted lists of an IVF kind (>= 1; ignored for flat).
        pq_m: bytes per row of "ivf-pq" (sub-quantisers of 8 bits; must divide D; ignored otherwise).

    Attributes:
        kind: the index type, e.g. "flat-ip".
        device: "cpu" or "cuda:0" ("cuda:0-3" when sharded over four GPUs).
        vectors: an optional (n, D) array (e.g. a np.memmap of the stored sketches, or `ConcatRows` of
            several) read by `all_scores`, `inner_products`, the GPU fallback and the refinement of
            approximate searches instead of faiss; see `attach_vectors`.
        chunk_rows: rows per step of the chunked scans.
        refine: approximate kinds: candidates taken from the codes per wanted row (>= 1), re-scored
            exactly when `vectors` are attached.
        shards: how many sub-indexes the rows are split over (1 = one index); see `shard`.
    """

    def __init__(self, dim: int, kind: str = "flat-ip", use_gpu: bool | None = None, nlist: int = 1,
                 pq_m: int = 8):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ConfigError(f"dim must be an integer >= 1, got {dim!r}")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("nlist", nlist), ("pq_m", pq_m)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        faiss = _import_faiss()
        self._setup(faiss, _FACTORIES[kind](faiss, int(dim), int(nlist), int(pq_m)), kind, use_gpu,
                    read_only=False)

    def _setup(self, faiss, cpu_index, kind: str, use_gpu: bool | None, read_only: bool) -> None:
        self.kind = kind
        self.vectors: Any = None
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * cpu_index.d))
        self.refine = 1
        self.shards = 1
        self._bounds: list[int] | None = None  # row ranges of the sub-indexes of a sharded flat index
        self._read_only = read_only
        self._gpu_res = None
        self._lock = threading.Lock()
        ivf = _ivf_parts(faiss, cpu_index)
        # kept here: a GPU copy of an IVF index is no faiss.IndexIVF
        self._nlist, self._nprobe = (int(ivf[0].nlist), int(ivf[0].nprobe)) if ivf else (0, 0)
        self._direction_nprobe: dict[str, int] = {}
        self.list_order: ListOrder | None = None  # norm-ranged lists (set_list_order)
        auto = use_gpu is None
        if use_gpu is None:
            use_gpu = gpu_available()
        elif use_gpu and not gpu_available():
            raise ConfigError("use_gpu=True but faiss sees no GPU: install faiss-gpu, or pass use_gpu=None/False")
        if use_gpu:
            # Keep the resources alive as long as the index: the GPU index only borrows them.
            self._gpu_res = faiss.StandardGpuResources()
            try:
                self._index = faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu_index)
            except RuntimeError as exc:  # e.g. an ivf-pq code size the GPU kernels do not support
                if not auto:
                    raise ConfigError(f"this {kind} index cannot go to the GPU ({_first_line(exc)}); use "
                                      "use_gpu=None/False") from exc
                self._gpu_res = None
                use_gpu = False
        if use_gpu:
            self.device = "cuda:0"
            self._k_cap: int | None = GPU_K_CAP
            self._read_only = False  # the GPU copy owns its memory, even when the CPU one was mapped
        else:
            self._index = cpu_index
            self.device = "cpu"
            self._k_cap = None

    # ----------------------------------------------------------------------------------------------
    # Building.

    @classmethod
    def from_array(cls, x: Any, kind: str = "flat-ip", use_gpu: bool | None = None, nlist: int = 1,
                   pq_m: int = 8, train: Any = None) -> SketchIndex:
        """An index over the rows of `x` (n, D), e.g. a np.memmap.

        Rows are added `chunk_rows` at a time, so a float64 or memory-mapped `x` is converted and read
        one chunk at a time.

        Args:
            train: approximate kinds: the training rows (m, D); default `x` itself.
        """
        a = np.asarray(x)
        if a.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, D), got shape {a.shape}")
        index = cls(a.shape[1], kind=kind, use_gpu=use_gpu, nlist=nlist, pq_m=pq_m)
        if not index.is_trained:
            index.train(a if train is None else train)
        for start in range(0, a.shape[0], index.chunk_rows):
            index.add(a[start : start + index.chunk_rows])
        return index

    @classmethod
    def build(cls, chunks: Iterable[Any], dim: int, kind: str = "flat-ip", use_gpu: bool | None = None) -> SketchIndex:
        """An index over row chunks (r_j, D) given in order (ids follow the concatenation)."""
        index = cls(dim, kind=kind, use_gpu=use_gpu)
        for chunk in chunks:
            index.add(chunk)
        return index

    def train(self, x: Any) -> None:
        """Train an approximate kind's coarse quantiser (k-means, nlist lists) and codes on rows `x` (m, D).

        m should be at least 39·nlist (faiss warns below), and at least 256 for "ivf-pq" (its codebooks
        have 256 entries; fewer rows raise ConfigError). Nothing to do for flat.
        """
        a = _as_matrix(x, self.dim, "training vectors")
        if self.kind == "ivf-pq" and a.shape[0] < 256:
            raise ConfigError(f"ivf-pq needs at least 256 training rows (its codebooks have 256 entries), got "
                              f"{a.shape[0]}; use ivf-sq8 or flat-ip for a corpus this small")
        if a.shape[0] < self._nlist:
            raise ConfigError(f"{a.shape[0]} training rows cannot train {self._nlist} lists; use nlist <= the rows")
        with self._lock:
            self._index.train(a)

    @property
    def is_trained(self) -> bool:
        """Whether rows can be added (always for flat; after `train` for the approximate kinds)."""
        return bool(self._index.is_trained)

    def add(self, x: Any) -> None:
        """Append the rows of `x` (r, D); they get ids ntotal .. ntotal + r − 1.

        Not safe concurrently with other calls on this index. faiss grows its storage geometrically, so
        a reallocation briefly holds old and new buffers (~1.3x the index at peak, measured on CPU).
        """
        if self._read_only:
            raise ValueError("this index is read-only (loaded with mmap=True, or sharded); add to an unsharded "
                             "index loaded with mmap=False")
        if not self.is_trained:
            raise ValueError(f"a {self.kind} index must be trained (train) before rows are added")
        a = _as_matrix(x, self.dim, "vectors")
        if a.shape[0] == 0:
            return
        with self._lock:
            self._index.add(a)

    # ----------------------------------------------------------------------------------------------
    # Approximate kinds: lists probed per query; sharding.

    def _ivf(self) -> list:
        return _ivf_parts(_import_faiss(), self._index)

    @property
    def nlist(self) -> int:
        """Inverted lists of an IVF kind; 0 for flat."""
        return self._nlist

    @property
    def nprobe(self) -> int:
        """Lists searched per query by an IVF kind (1..nlist); 0 for flat. Saved with the index."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if not self._nlist:
            raise ConfigError(f"a {self.kind} index has no nprobe")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= self._nlist:
            raise ConfigError(f"nprobe must be an integer in 1..nlist ({self._nlist}), got {value!r}")
        faiss = _import_faiss()
        with self._lock:
            if self._gpu_res is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", int(value))
            for ivf in self._ivf():  # CPU indexes (and the CPU sub-indexes of a sharded one)
                ivf.nprobe = int(value)
            self._nprobe = int(value)

    @property
    def direction_nprobe(self) -> dict[str, int]:
        """Lists probed per direction where it differs from `nprobe`, e.g. {"most": 1, "least": 256}."""
        return dict(self._direction_nprobe)

    def set_direction_nprobe(self, most: int | None = None, least: int | None = None) -> None:
        """Probe `most` lists for "most" searches and `least` for "least" ones (None: `nprobe`).

        The two directions can need very different nprobe for the same recall: the largest inner products
        of a query gather in the lists of its own region, the smallest are spread over the whole corpus.
        """
        if not self._nlist:
            raise ConfigError(f"a {self.kind} index has no nprobe")
        out = {}
        for direction, value in (("most", most), ("least", least)):
            if value is None:
                continue
            top = self.list_order.nlist if self.list_order is not None and direction == "most" else self._nlist
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= top:
                raise ConfigError(f"nprobe ({direction}) must be an integer in 1..{top}, got {value!r}")
            out[direction] = int(value)
        self._direction_nprobe = out

    def set_list_order(self, order: ListOrder | None) -> None:
        """Probe this IVF index's lists as `order` says (norm-ranged lists; None: plainly, by the quantiser).

        With an order, `direction_nprobe` counts centroids for "most" (each probes its B lists) and lists
        for "least". Searches on one CPU index follow it; a GPU or sharded index probes plainly instead:
        B·nprobe lists for "most" (the same rows) and every list for "least" (slower; on a GPU at most
        GPU_K_CAP lists, the quantiser's best: every bucket of the best GPU_K_CAP / B centroids).
        """
        if order is not None:
            if not self._nlist or order.nlist * order.buckets != self._nlist:
                raise ConfigError(f"a list order of {order.nlist} x {order.buckets} lists does not fit this "
                                  f"{self.kind} index of {self._nlist} lists")
            if order.ntotal != self.ntotal:
                raise IndexCorruptError(f"the list order counts {order.ntotal} rows, the index holds {self.ntotal}")
        self.list_order = order

    def _probe_count(self, direction: str) -> int:
        """Lists ("least") or centroids ("most") probed with a list order (see set_list_order)."""
        order = self.list_order
        default = max(1, self._nprobe // order.buckets) if direction == "most" else self._nlist
        return self._direction_nprobe.get(direction, default)

    def probed_share(self, queries: Any, direction: str = "most") -> float:
        """The mean share of all rows whose codes a search of `queries` (q, D) scans (1.0 for flat).

        The rows of the probed lists: by the list order when there is one, else the quantiser's nprobe
        best lists (direction_nprobe).
        """
        q = _as_matrix(queries, self.dim, "queries")
        direction = _check_direction(direction)
        if self.kind in _EXACT or self.ntotal == 0 or q.shape[0] == 0:
            return 1.0
        if direction == "least":
            q = -q
        if self.list_order is not None:
            lists, _ = self.list_order.probe(q, direction, self._probe_count(direction))
            return self.list_order.share(lists)
        parts = _ivf_parts(_import_faiss(), self._cpu_index())  # a GPU index: a host copy, for the time of the count
        sizes = sum(np.array([p.invlists.list_size(i) for i in range(p.nlist)], dtype=np.int64) for p in parts)
        _, lists = parts[0].quantizer.search(q, self._direction_nprobe.get(direction, self._nprobe))
        return float(np.where(lists >= 0, sizes[np.maximum(lists, 0)], 0).sum(axis=1).mean() / self.ntotal)

    def _ordered_search(self, q: np.ndarray, k: int, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """An IVF search of the lists the list order picks (one CPU index) or its plain equivalent."""
        faiss = _import_faiss()
        count = self._probe_count(direction)
        if self._gpu_res is not None or self.shards != 1:
            plain = count * self.list_order.buckets if direction == "most" else self._nlist
            if self._k_cap is not None:  # faiss GPU probes at most GPU_K_CAP lists
                plain = min(plain, self._k_cap)
            return self._ivf_search(q, k, min(plain, self._nlist))
        lists, coarse = self.list_order.probe(q, direction, count)
        ivf = self._ivf()[0]
        n = q.shape[0]
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=int(lists.shape[1]))  # per call: concurrent searches stay safe
        ivf.search_preassigned_c(n, faiss.swig_ptr(q), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                                 faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
        return scores, ids

    def _ivf_search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """An IVF search probing `nprobe` lists (the index's own setting is left as it is afterwards)."""
        faiss = _import_faiss()
        if self._gpu_res is None and self.shards == 1:  # per-call parameters: concurrent searches stay safe
            return self._index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        with self._lock:  # GPU and sharded indexes take the setting itself, one search at a time
            space = faiss.GpuParameterSpace() if self._gpu_res is not None else faiss.ParameterSpace()
            space.set_index_parameter(self._index, "nprobe", nprobe)
            try:
                return self._index.search(q, k)
            finally:
                space.set_index_parameter(self._index, "nprobe", self._nprobe)

    def shard(self, parts: int | None = None) -> None:
        """Split the rows over `parts` sub-indexes searched together (IndexShards); same results as one index.

        On GPUs: one sub-index per GPU (parts = None: every GPU faiss sees; faiss's sharded cloner). On the
        CPU: `parts` CPU sub-indexes of contiguous rows (parts = None: 1, nothing to do). Afterwards the
        index is read-only (`add` raises). Scans without attached vectors read a sharded flat index's rows
        from its sub-indexes.
        """
        faiss = _import_faiss()
        if parts is None:
            parts = faiss.get_num_gpus() if self._gpu_res is not None else 1
        if isinstance(parts, bool) or not isinstance(parts, numbers.Integral) or parts < 1:
            raise ConfigError(f"shards must be an integer >= 1, got {parts!r}")
        if self.shards != 1:
            raise ValueError("this index is sharded already")
        if parts == 1:
            return
        nprobe = self.nprobe
        n = self.ntotal
        with self._lock:
            if self._gpu_res is not None:
                if parts > faiss.get_num_gpus():
                    raise ConfigError(f"cannot shard over {parts} GPUs: faiss sees {faiss.get_num_gpus()}")
                cpu = faiss.index_gpu_to_cpu(self._index)
                co = faiss.GpuMultipleClonerOptions()
                co.shard = True  # flat: contiguous rows, successive ids; IVF: the lists split, global ids kept
                self._index = faiss.index_cpu_to_all_gpus(cpu, co=co, ngpu=int(parts))
                self._gpu_res = self._index  # the sharded index holds its own GPU resources
                self.device = f"cuda:0-{parts - 1}"
            else:
                self._index = _shard_cpu(faiss, self._index, int(parts))
        if not self._ivf():
            self._bounds = [n * j // parts for j in range(parts + 1)]
        self.shards = int(parts)
        self._read_only = True
        if nprobe:
            self.nprobe = nprobe

    # ----------------------------------------------------------------------------------------------
    # Properties.

    @property
    def ntotal(self) -> int:
        """n, the number of stored vectors."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """D, the sketch dimension."""
        return int(self._index.d)

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind in APPROXIMATE else ""
        extra += f", shards={self.shards}" if self.shards != 1 else ""
        return f"SketchIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal}, device={self.device!r}{extra})"

    def attach_vectors(self, vectors: Any) -> None:
        """Use `vectors` (n, D), e.g. np.load(path, mmap_mode="r"), for exact scans instead of faiss.

        They must be the rows that were added, in the same order; only the shape is checked (here and
        again at each use, in case rows were added since).
        """
        self._check_vectors(vectors)
        self.vectors = vectors

    def _check_vectors(self, vectors: Any) -> None:
        shape = tuple(getattr(vectors, "shape", ()))
        if shape != (self.ntotal, self.dim):
            raise ValueError(f"attached vectors have shape {shape}, the index holds ({self.ntotal}, {self.dim})")

    # ----------------------------------------------------------------------------------------------
    # Search.

    def search(self, queries: Any, k: int, direction: str = "most") -> tuple[np.ndarray, np.ndarray]:
        """The k rows with the largest ("most") or smallest ("least") inner products per query.

        Args:
            queries: (q, D) sketches, finite; converted to float32.
            k: candidates per query, >= 1; clamped to ntotal.
            direction: "most" (scores descending) or "least" (scores ascending).

        Returns:
            scores (q, k') float32, the inner products <q, s_id>, and ids (q, k') int64, k' = min(k, n).
            An approximate kind may find fewer than k' rows for a query (few lists probed): the missing
            places hold id -1 and score −inf ("most") or +inf ("least"), at the end. Its scores are exact
            when `vectors` are attached, else the codes' approximations.
        """
        q = _as_matrix(queries, self.dim, "queries")
        k = min(_check_k(k), self.ntotal)
        direction = _check_direction(direction)
        if k == 0 or q.shape[0] == 0:
            return np.empty((q.shape[0], k), dtype=np.float32), np.empty((q.shape[0], k), dtype=np.int64)
        if direction == "least":
            q = -q
        approx = self.kind not in _EXACT
        wanted = min(k * self.refine, self.ntotal) if approx else k
        if self._k_cap is not None and wanted > self._k_cap:
            if approx and self.vectors is None:
                raise ValueError(f"k = {k} (x refine {self.refine}) is above the GPU limit of {self._k_cap} for an "
                                 "approximate index; attach the stored vectors (attach_vectors) for an exact scan")
            scores, ids = chunked_topk(q, self._chunks(), k)  # exact: at least as good as the codes
            approx = False
        elif approx and self.list_order is not None:
            scores, ids = self._ordered_search(q, wanted, direction)
        elif approx and self._direction_nprobe.get(direction, self._nprobe) != self._nprobe:
            scores, ids = self._ivf_search(q, wanted, self._direction_nprobe[direction])
        elif self._gpu_res is not None:
            with self._lock:
                scores, ids = self._index.search(q, wanted)
        else:
            scores, ids = self._index.search(q, wanted)
        ids = ids.astype(np.int64, copy=False)
        if approx:
            scores, ids = self._refined(q, scores, ids, k)
        if direction == "least":
            scores = -scores
        return scores, ids

    def _refined(self, q: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of an approximate search's candidates (q, m), by exact <q, s_id> when vectors are attached.

        Ties go to the lower id; missing candidates (id -1) score −inf and come last.
        """
        if self.vectors is not None:
            scores = np.full(ids.shape, -np.inf, dtype=np.float32)
            for row in range(ids.shape[0]):
                found = ids[row] >= 0
                if found.any():
                    scores[row, found] = self.inner_products(q[row : row + 1], ids[row, found])[0]
        else:
            scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
        order = np.lexsort((key, -scores), axis=-1)[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows start..start + r) over all stored vectors, from `vectors` or else from faiss."""
        step = chunk_rows or self.chunk_rows
        if self.vectors is not None:
            self._check_vectors(self.vectors)
        for start in range(0, self.ntotal, step):
            r = min(step, self.ntotal - start)
            if self.vectors is not None:
                block = np.ascontiguousarray(self.vectors[start : start + r], dtype=np.float32)
            else:
                block = self._reconstruct(np.arange(start, start + r, dtype=np.int64))
            yield start, block

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored rows `ids` (m,) → (m, D), read back from faiss (flat kinds only, sharded or not)."""
        if self.kind not in _EXACT:
            raise ValueError(f"a {self.kind} index stores only codes: attach the stored vectors (attach_vectors) "
                             "for exact scans")
        with self._lock:
            if self._bounds is None:
                if ids.size and ids[-1] - ids[0] == ids.size - 1 and (np.diff(ids) == 1).all():
                    return self._index.reconstruct_n(int(ids[0]), int(ids.size))
                return self._index.reconstruct_batch(ids)
            faiss = _import_faiss()
            shards = faiss.downcast_index(self._index)
            out = np.empty((ids.size, self.dim), dtype=np.float32)
            part = np.searchsorted(self._bounds, ids, side="right") - 1
            for j in np.unique(part):
                pos = np.flatnonzero(part == j)
                sub = faiss.downcast_index(shards.at(int(j)))
                out[pos] = sub.reconstruct_batch(ids[pos] - self._bounds[j])
            return out

    def all_scores(self, query: Any, chunk_rows: int | None = None) -> np.ndarray:
        """<q, s_i> for every stored row: query (D,) → (n,), or (q, D) → (q, n), float32.

        Computed as q @ Xᵀ one chunk of rows at a time, from `vectors` when attached (never all of X in
        memory) and otherwise from vectors reconstructed out of the index.
        """
        a = np.asarray(query)
        one = a.ndim == 1
        q = _as_matrix(a[None, :] if one else a, self.dim, "queries")
        out = np.empty((q.shape[0], self.ntotal), dtype=np.float32)
        for start, block in self._chunks(chunk_rows):
            out[:, start : start + block.shape[0]] = q @ block.T
        return out[0] if one else out

    def inner_products(self, queries: Any, ids: Any) -> np.ndarray:
        """<q_j, s_id> for the given rows: queries (q, D), ids (m,) → (q, m) float32."""
        q = _as_matrix(queries, self.dim, "queries")
        ids = _check_ids(ids, self.ntotal)
        if self.vectors is not None:
            self._check_vectors(self.vectors)
            rows = np.ascontiguousarray(self.vectors[ids], dtype=np.float32)
        elif ids.size:
            rows = self._reconstruct(ids)
        else:
            rows = np.empty((0, self.dim), dtype=np.float32)
        return q @ rows.T

    # ----------------------------------------------------------------------------------------------
    # Persistence (faiss's own format; never pickle).

    def _cpu_index(self):
        if self._gpu_res is None:
            return self._index
        faiss = _import_faiss()
        with self._lock:
            return faiss.index_gpu_to_cpu(self._index)  # a full host copy, for the time of the write

    def save(self, path: str | os.PathLike) -> None:
        """Write the index with faiss.write_index, streamed into `files.write_atomic` (fsync'd, atomic rename).

        The rename also keeps an index that is memory-mapped from `path` valid: it keeps the old file.
        """
        faiss = _import_faiss()
        if self.shards != 1:
            raise ValueError("a sharded index cannot be saved; save the index before sharding it")
        index = self._cpu_index()
        write_atomic(path, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))

    @classmethod
    def load(cls, path: str | os.PathLike, use_gpu: bool | None = None, mmap: bool = False) -> SketchIndex:
        """Read an index written by `save`.

        Args:
            path: the file.
            use_gpu: as in the constructor.
            mmap: map the vectors from the file instead of reading them (CPU only: a GPU copies them
                anyway). The result is read-only (`add` raises), and the file must not be changed or
                truncated while the index is in use.

        Raises:
            FileNotFoundError: no such file.
            IndexCorruptError: the file is not a readable FAISS index of one of the KINDS.
        """
        faiss = _import_faiss()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no index file at {path}")
        # IO_FLAG_MMAP alone maps only inverted lists; flat storage needs IO_FLAG_MMAP_IFC (faiss >= 1.10).
        flags = (faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0)) if mmap else 0
        try:
            cpu_index = faiss.read_index(path, flags)
        except RuntimeError as exc:
            raise IndexCorruptError(f"{path}: not a readable FAISS index ({_first_line(exc)}); rebuild it") from exc
        return cls._wrap(faiss, cpu_index, path, use_gpu, read_only=mmap)

    def write(self, f: Any) -> None:
        """Write the index in faiss's file format to the binary file object `f` (streamed: no copy in memory)."""
        if self.shards != 1:
            raise ValueError("a sharded index cannot be written; write the index before sharding it")
        faiss = _import_faiss()
        writer = faiss.PyCallbackIOWriter(f.write)
        try:
            faiss.write_index(self._cpu_index(), writer)
        finally:
            del writer  # flushes its buffer into f

    def to_bytes(self) -> bytes:
        """The index in faiss's file format, as bytes (faiss.serialize_index)."""
        if self.shards != 1:
            raise ValueError("a sharded index cannot be serialised; serialise the index before sharding it")
        return _import_faiss().serialize_index(self._cpu_index()).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, use_gpu: bool | None = None) -> SketchIndex:
        """The inverse of `to_bytes` (faiss.deserialize_index). Raises IndexCorruptError on bad bytes."""
        faiss = _import_faiss()
        try:
            cpu_index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexCorruptError(f"bytes are not a FAISS index ({_first_line(exc)})") from exc
        return cls._wrap(faiss, cpu_index, "the bytes", use_gpu, read_only=False)

    @classmethod
    def _wrap(cls, faiss, cpu_index, source: str, use_gpu: bool | None, read_only: bool) -> SketchIndex:
        kind = _kind_of(faiss, cpu_index)
        if kind is None:
            raise IndexCorruptError(
                f"{source}: holds a {type(faiss.downcast_index(cpu_index)).__name__}, not one of the kinds {KINDS}"
            )
        self = cls.__new__(cls)
        # Keep read_index's own wrapper: it owns the C++ index (a downcast_index view does not).
        self._setup(faiss, cpu_index, kind, use_gpu, read_only=read_only)
        return self


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__
