"""First-stage candidate retrieval: a thin wrapper over FAISS inner-product search of sketch vectors.

Each training sample i has a float32 sketch s_i (D,) with <s_v, s_i> ≈ S(v, i). For a query sketch q,

    most:  the k rows with the largest  <q, s_i>, scores descending;
    least: the k rows with the smallest <q, s_i>, scores ascending (searched as the largest <−q, s_i>,
           scores negated back, so every returned score is the true inner product).

Exact re-ranking of the candidates happens elsewhere. Ids are row numbers 0..n−1 in the order rows were
added (no `add_with_ids`: GpuIndexFlat does not support it).

Kinds: only "flat-ip" (IndexFlatIP, exact) for now; `_FACTORIES` and `_kind_of` are where an IVF/PQ kind
goes (it will need a `train` step and, being approximate, its recall measured against flat search: IVF
with inner product uses normalised centroids and can miss large-norm rows).

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

from .errors import ConfigError, IndexCorruptError

KINDS = ("flat-ip",)
DIRECTIONS = ("most", "least")
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


def _make_flat_ip(faiss, dim: int):
    return faiss.IndexFlatIP(dim)


_FACTORIES = {"flat-ip": _make_flat_ip}
_EXACT = {"flat-ip"}  # kinds whose search equals the chunked exact scan (the GPU k > cap fallback)


def _kind_of(faiss, index) -> str | None:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "flat-ip"
    return None


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


def _chunked_topk(
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


class SketchIndex:
    """Inner-product search over n sketch vectors (n, D), ids = row numbers.

    Make one empty and `add` chunks (a build never holds all vectors twice: only the index and the
    current chunk), or use `from_array` / `build`; reopen one with `load` / `from_bytes`.

    Args:
        dim: D, the sketch dimension.
        kind: index type; only "flat-ip" (exact IndexFlatIP) for now.
        use_gpu: True = GPU (ConfigError if faiss sees none), False = CPU, None = GPU when available.

    Attributes:
        kind: the index type, e.g. "flat-ip".
        device: "cpu" or "cuda:0".
        vectors: an optional (n, D) array (e.g. a np.memmap of the stored sketches) read by
            `all_scores`, `inner_products` and the GPU fallback instead of faiss; see `attach_vectors`.
        chunk_rows: rows per step of the chunked scans.
    """

    def __init__(self, dim: int, kind: str = "flat-ip", use_gpu: bool | None = None):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ConfigError(f"dim must be an integer >= 1, got {dim!r}")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        faiss = _import_faiss()
        self._setup(faiss, _FACTORIES[kind](faiss, int(dim)), kind, use_gpu, read_only=False)

    def _setup(self, faiss, cpu_index, kind: str, use_gpu: bool | None, read_only: bool) -> None:
        self.kind = kind
        self.vectors: Any = None
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * cpu_index.d))
        self._read_only = read_only
        self._gpu_res = None
        self._lock = threading.Lock()
        if use_gpu is None:
            use_gpu = gpu_available()
        elif use_gpu and not gpu_available():
            raise ConfigError("use_gpu=True but faiss sees no GPU: install faiss-gpu, or pass use_gpu=None/False")
        if use_gpu:
            # Keep the resources alive as long as the index: the GPU index only borrows them.
            self._gpu_res = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_res, 0, cpu_index)
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
    def from_array(cls, x: Any, kind: str = "flat-ip", use_gpu: bool | None = None) -> SketchIndex:
        """An index over the rows of `x` (n, D), e.g. a np.memmap.

        Rows are added `chunk_rows` at a time, so a float64 or memory-mapped `x` is converted and read
        one chunk at a time.
        """
        a = np.asarray(x)
        if a.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, D), got shape {a.shape}")
        index = cls(a.shape[1], kind=kind, use_gpu=use_gpu)
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

    def add(self, x: Any) -> None:
        """Append the rows of `x` (r, D); they get ids ntotal .. ntotal + r − 1.

        Not safe concurrently with other calls on this index. faiss grows its storage geometrically, so
        a reallocation briefly holds old and new buffers (~1.3x the index at peak, measured on CPU).
        """
        if self._read_only:
            raise ValueError("this index was loaded with mmap=True and is read-only; load it with mmap=False to add")
        a = _as_matrix(x, self.dim, "vectors")
        if a.shape[0] == 0:
            return
        with self._lock:
            self._index.add(a)

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
        return f"SketchIndex(kind={self.kind!r}, dim={self.dim}, ntotal={self.ntotal}, device={self.device!r})"

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
        """
        q = _as_matrix(queries, self.dim, "queries")
        k = min(_check_k(k), self.ntotal)
        direction = _check_direction(direction)
        if k == 0 or q.shape[0] == 0:
            return np.empty((q.shape[0], k), dtype=np.float32), np.empty((q.shape[0], k), dtype=np.int64)
        if direction == "least":
            q = -q
        if self._k_cap is not None and k > self._k_cap:
            assert self.kind in _EXACT, "an approximate kind needs its own fallback beyond the GPU k cap"
            scores, ids = _chunked_topk(q, self._chunks(), k)
        elif self._gpu_res is not None:
            with self._lock:
                scores, ids = self._index.search(q, k)
        else:
            scores, ids = self._index.search(q, k)
        if direction == "least":
            scores = -scores
        return scores, ids.astype(np.int64, copy=False)

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
                with self._lock:
                    block = self._index.reconstruct_n(start, r)
            yield start, block

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
            with self._lock:
                rows = self._index.reconstruct_batch(ids)
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
        """Write the index with faiss.write_index (through a temporary file, then an atomic rename).

        The rename also keeps an index that is memory-mapped from `path` valid: it keeps the old file.
        """
        faiss = _import_faiss()
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            faiss.write_index(self._cpu_index(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

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
            IndexCorruptError: the file is not a readable flat inner-product FAISS index.
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

    def to_bytes(self) -> bytes:
        """The index in faiss's file format, as bytes (faiss.serialize_index)."""
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
