"""The first stage of an index: which FAISS kind, how it is trained, and its recall against flat search.

Below `approx_threshold` rows an index uses exact flat search ("flat-ip", built from the stored sketches
when the index is loaded: nothing extra on disk). From the threshold on, "auto" picks "ivf-sq8": an
inverted file of nlist ≈ √n lists (trained by k-means on a seeded sample) with 8-bit codes, D bytes a
row instead of 4·D, searched over `nprobe` lists and refined by exact inner products of the best
`refine`·k candidates (read from the stored sketches). "ivf-pq" (pq_m bytes a row) is there when
memory matters more than recall.

Recall is measured at build time and published in the manifest: `recall_queries` training sketches,
sampled with the seed, are used as queries (each one's own row left out of both answers, so the query is
held out), for "most" and "least"; recall@k = |approximate top-k ∩ flat top-k| / k, averaged over
queries. With nprobe = 0 each direction gets the smallest nprobe of its ladder whose recall reaches
`min_recall` (they differ a lot: a query's largest inner products gather in the lists of its own region,
its smallest are long rows spread over the whole corpus); a first stage that cannot reach it in either
direction is refused (RecallTooLowError) naming what to change. The share of the rows whose codes each
direction scans is published beside its recall (`recall.scanned_share`). IVF with inner product uses
normalised centroids and can miss large-norm rows: the measured recall, not the theory, decides.

Norm-ranged lists (`norm_buckets` B > 1, the default 4; ann.ListOrder): each centroid's rows are split by
norm into B lists, so that "least" probes the lists whose estimated largest <−q, x> is highest (long rows
in regions facing away from q) and skips the short rows everywhere. "most" probes every bucket of the
plain IVF's nprobe centroids: the same rows, the same answers as plain lists. "least" is chosen on a
ladder of √2 steps over all B·nlist lists, "most" on powers of two of the nlist centroids.

Everything here works on arrays: `vectors` is any (n, D) array-like read by row slices and row lists
(a np.memmap, or `ann.ConcatRows` of the shards' memory-mapped sketches); writing files is the caller's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .ann import ListOrder, SketchIndex, chunked_topk
from .config import APPROXIMATE_KINDS as APPROXIMATE, FirstStageConfig
from .errors import ConfigError, IndexCorruptError, RecallTooLowError
from .results import DIRECTIONS

INDEX_FILE = "index.faiss"
ID_BYTES = 8  # faiss stores an int64 id per row in the inverted lists



def choose_kind(n: int, config: FirstStageConfig) -> str:
    """The kind built for n rows: config.kind, or for "auto" flat-ip below approx_threshold, else ivf-sq8."""
    if config.kind != "auto":
        return config.kind
    return "flat-ip" if n < config.approx_threshold else "ivf-sq8"


def auto_nlist(n: int) -> int:
    """About √n inverted lists, at most n // 39 (faiss's k-means wants 39 training rows a list), at least 1."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def sample_rows(n: int, m: int, seed: int) -> np.ndarray:
    """min(n, m) distinct rows of 0..n−1, sorted, drawn with `seed` (sorted: memory-mapped reads go forward)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, m), replace=False)).astype(np.int64)


def recall_at_k(found: Any, truth: Any) -> float:
    """Mean over rows of |found_i ∩ truth_i| / |truth_i|: found (q, k') and truth (q, k) row ids (−1: none).

    The reference for the first stage: truth is the flat (exact) top-k, found the approximate one.
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or found.shape[0] != truth.shape[0]:
        raise ValueError(f"found and truth must be (q, k) arrays with the same q, got {found.shape} and {truth.shape}")
    if truth.shape[0] == 0 or truth.shape[1] == 0:
        return 1.0
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth)]
    return float(np.mean(hits))


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row of `ids` (q, k + 1) without its query's own row `self_ids[i]`, cut to k columns (held out);
    −1 fills a row left shorter than k."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for i, row in enumerate(ids):
        kept = row[row != self_ids[i]][:k]
        out[i, : kept.size] = kept
    return out


def _chunks(vectors: Any, rows: int):
    n = vectors.shape[0]
    for a in range(0, n, rows):
        yield a, np.ascontiguousarray(vectors[a : min(a + rows, n)], dtype=np.float32)


def flat_truth(vectors: Any, query_rows: np.ndarray, k: int, chunk_rows: int = 16384) -> dict[str, np.ndarray]:
    """The exact top-k rows, "most" and "least", for the training rows `query_rows` as queries, self left out.

    One chunked pass over `vectors` (n, D) (memory-mapped input is read once; nothing of size n·D is held).
    """
    q = np.ascontiguousarray(vectors[query_rows], dtype=np.float32)
    k1 = min(k + 1, vectors.shape[0])
    q2 = np.concatenate([q, -q])  # "least" = the largest <−q, x>: one pass answers both
    _, ids = chunked_topk(q2, _chunks(vectors, chunk_rows), k1)
    m = q.shape[0]
    return {"most": drop_self(ids[:m], query_rows, k), "least": drop_self(ids[m:], query_rows, k)}


def measure_recall(index: SketchIndex, vectors: Any, query_rows: np.ndarray, truth: dict[str, np.ndarray],
                   k: int, directions: tuple[str, ...] = DIRECTIONS) -> dict[str, float]:
    """recall@k of `index` against `truth` (from `flat_truth`) per direction, self left out."""
    q = np.ascontiguousarray(vectors[query_rows], dtype=np.float32)
    out = {}
    for direction in directions:
        _, ids = index.search(q, k + 1, direction)
        out[direction] = round(recall_at_k(drop_self(ids, query_rows, k), truth[direction]), 4)
    return out


def _nprobe_ladder(nlist: int) -> list[int]:
    ladder = [1]
    while ladder[-1] * 2 < nlist:
        ladder.append(ladder[-1] * 2)
    if ladder[-1] != nlist:
        ladder.append(nlist)
    return ladder


def build_first_stage(vectors: Any, config: FirstStageConfig = FirstStageConfig(), use_gpu: bool | None = None
                      ) -> tuple[SketchIndex | None, dict]:
    """The first stage over `vectors` (n, D): (an approximate index, or None for flat; what the manifest records).

    For flat nothing is built (the index is built from the stored sketches when loaded) and recall is 1 by
    definition. For an approximate kind: train on a seeded sample, add every row in chunks, attach
    `vectors` (refinement), measure recall (choosing nprobe when config.nprobe = 0) and refuse it when
    below config.min_recall.

    Returns:
        (index or None, info) with info = {"kind", "ntotal", "dim", "stored", "auto", ...}; approximate
        kinds add "file", "nlist", "nprobe" (the faiss setting: the larger of the two directions' lists),
        "nprobe_by_direction" (with norm-ranged lists: centroids for "most", lists for "least"), "refine",
        "train_rows", "code_bytes_per_row" (pq_m or D, plus 8 for the id), "pq_m" (ivf-pq), "recall" {"k",
        "queries", "most", "least", "scanned_share" {"most", "least"}, "min_recall", "by_nprobe" (the
        measured curve, entries {"nprobe", <direction>: recall, "scanned_share"}; a direction stops at
        the first nprobe reaching min_recall)}, "train_seconds", "add_seconds", "recall_seconds"; with
        norm-ranged lists also "norm_buckets", "norm_edges" and "list_order" {"scale", "spread"}.

    Raises:
        RecallTooLowError: the recall in either direction stays below config.min_recall.
        ConfigError: nlist above n, or ivf-pq with fewer than 256 training rows or a pq_m that does not
            divide D.
    """
    n, dim = int(vectors.shape[0]), int(vectors.shape[1])
    kind = choose_kind(n, config)
    info: dict[str, Any] = {"kind": kind, "ntotal": n, "dim": dim, "stored": kind in APPROXIMATE,
                            "auto": {"threshold": config.approx_threshold} if config.kind == "auto" else None}
    if kind not in APPROXIMATE:
        return None, info
    if n < 2:
        raise ConfigError(f"a corpus of {n} rows cannot train and measure a {kind} first stage; use flat-ip")
    nlist = config.nlist or auto_nlist(n)
    if nlist > n:
        raise ConfigError(f"nlist ({nlist}) is above the number of rows ({n}); use a smaller nlist (or 0 = auto)")
    if config.nprobe > nlist:
        raise ConfigError(f"nprobe ({config.nprobe}) must be at most nlist ({nlist})")
    index = SketchIndex(dim, kind=kind, use_gpu=use_gpu, nlist=nlist, pq_m=config.pq_m)
    t0 = time.perf_counter()
    train_ids = sample_rows(n, config.train_rows or max(50 * nlist, 10_000), config.seed)
    train = vectors[train_ids]
    _seed_kmeans(index, config.seed)
    index.train(train)
    t1 = time.perf_counter()
    ranged: dict[str, Any] = {}
    if config.norm_buckets > 1:
        index, ranged = _norm_ranged(index, vectors, np.asarray(train, dtype=np.float32), config)
    else:
        for _, block in _chunks(vectors, index.chunk_rows):
            index.add(block)
    t2 = time.perf_counter()
    index.attach_vectors(vectors)
    index.refine = config.refine
    k = min(config.recall_k, max(1, n - 1))
    query_rows = sample_rows(n, config.recall_queries, config.seed + 1)
    truth = flat_truth(vectors, query_rows, k)
    chosen, best, share, by_nprobe = _choose_nprobe(index, vectors, query_rows, truth, k, config, nlist)
    buckets = index.list_order.buckets if index.list_order is not None else 1
    index.nprobe = max(chosen["most"] * buckets, chosen["least"]) if buckets > 1 else max(chosen.values())
    index.set_direction_nprobe(most=chosen["most"], least=chosen["least"])
    t3 = time.perf_counter()
    code = config.pq_m if kind == "ivf-pq" else dim
    info.update(file=INDEX_FILE, nlist=nlist, nprobe=index.nprobe, nprobe_by_direction=chosen, refine=config.refine,
                train_rows=int(train_ids.size), code_bytes_per_row=code + ID_BYTES, **ranged,
                recall={"k": k, "queries": int(query_rows.size), "most": best["most"], "least": best["least"],
                        "scanned_share": share, "min_recall": config.min_recall, "by_nprobe": by_nprobe},
                train_seconds=round(t1 - t0, 2), add_seconds=round(t2 - t1, 2), recall_seconds=round(t3 - t2, 2))
    if kind == "ivf-pq":
        info["pq_m"] = config.pq_m
    if min(best["most"], best["least"]) < config.min_recall:
        tried = "nprobe " + (str(config.nprobe) if config.nprobe else f"up to nlist = {nlist}")
        raise RecallTooLowError(
            f"the {kind} first stage (nlist {nlist}, {tried}, refine {config.refine}) reaches recall@{k} "
            f"{best['most']:.3f} (most) and {best['least']:.3f} (least) against flat search on "
            f"{query_rows.size} held-out training sketches, below the required {config.min_recall}; raise "
            "--nprobe (or leave it 0 = automatic) or --refine, use --index-kind ivf-sq8 (if ivf-pq) or flat-ip, "
            "or lower --min-recall. The finished shards are kept: the rerun only rebuilds the first stage")
    return index, info


def _fine_ladder(top: int) -> list[int]:
    """round(√2^i) for i = 0, 1, ... (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ...) below `top`, then `top`: the
    "least" ladder over norm-ranged lists (finer than powers of two: the share scanned is what counts)."""
    ladder, i = [1], 1
    while ladder[-1] < top:
        step = min(top, int(round(math.sqrt(2) ** i)))
        if step > ladder[-1]:
            ladder.append(step)
        i += 1
    return ladder


def _choose_nprobe(index: SketchIndex, vectors: Any, query_rows: np.ndarray, truth: Any, k: int,
                   config: FirstStageConfig, nlist: int
                   ) -> tuple[dict[str, int], dict[str, float], dict[str, float], list[dict]]:
    """(nprobe per direction, its measured recall, the share of the rows it scans, the curve measured).

    Each direction gets the smallest nprobe of its ladder reaching config.min_recall (or the last one tried):
    powers of two of the nlist centroids; for "least" over norm-ranged lists, steps of √2 over all B·nlist
    lists. config.nprobe > 0 is the only one tried (B·nprobe lists for "least" over norm-ranged lists).
    Curve entries: {"nprobe", <direction>: recall, "scanned_share"}.
    """
    order = index.list_order
    q = np.ascontiguousarray(vectors[query_rows], dtype=np.float32)
    by_nprobe: list[dict] = []
    chosen: dict[str, int] = {}
    best: dict[str, float] = {}
    share: dict[str, float] = {}
    for direction in DIRECTIONS:
        lists = order is not None and direction == "least"
        if config.nprobe:
            ladder = [config.nprobe * order.buckets if lists else config.nprobe]
        else:
            ladder = _fine_ladder(nlist * order.buckets) if lists else _nprobe_ladder(nlist)
        for nprobe in ladder:
            index.set_direction_nprobe(**{direction: nprobe})
            r = measure_recall(index, vectors, query_rows, truth, k, (direction,))[direction]
            s = round(index.probed_share(q, direction), 4)
            by_nprobe.append({"nprobe": nprobe, direction: r, "scanned_share": s})
            chosen[direction], best[direction], share[direction] = nprobe, r, s
            if r >= config.min_recall:
                break
    return chosen, best, share, by_nprobe


def _norm_ranged(base: SketchIndex, vectors: Any, train: np.ndarray, config: FirstStageConfig
                 ) -> tuple[SketchIndex, dict]:
    """An IVF index of B·nlist norm-ranged lists (ann.ListOrder) over `vectors`, from `base` (trained, empty).

    Bucket b holds the rows whose norm lies between the training sample's norm quantiles 1 − 2^−b and
    1 − 2^−(b+1) (halving: the longest rows, which hold the smallest inner products, get the finest
    buckets). Rows keep base's centroid (the plain IVF's assignment), so "most" scans the same rows.
    Built on the CPU (faiss assigns lists only there through add_core).

    Returns:
        (the index, with its list order set; manifest fields "norm_buckets", "norm_edges", "list_order"
        {"scale", "spread"}, rounded to 6 digits and used as rounded).
    """
    import faiss
    from faiss.contrib.ivf_tools import add_preassigned

    B = config.norm_buckets
    cpu = faiss.extract_index_ivf(base._cpu_index())
    nlist = int(cpu.nlist)
    centroids = cpu.quantizer.reconstruct_n(0, nlist)
    pq_m = int(faiss.downcast_index(cpu).pq.M) if base.kind == "ivf-pq" else 8
    index = SketchIndex(base.dim, kind=base.kind, use_gpu=False, nlist=B * nlist, pq_m=pq_m)
    ivf = index._ivf()[0]
    ivf.quantizer.add(np.tile(centroids, (B, 1)))  # trained: index.train only trains the codes
    _seed_kmeans(index, config.seed)
    index.train(train)
    edges = np.quantile(np.linalg.norm(train, axis=1), 1.0 - 0.5 ** np.arange(1, B)).astype(np.float32)
    assign = faiss.IndexFlatIP(base.dim)
    assign.add(centroids)
    cnorm = np.linalg.norm(centroids, axis=1)
    L = B * nlist
    count, rmax, cos = np.zeros(L), np.zeros(L), np.zeros(L)
    for _, block in _chunks(vectors, index.chunk_rows):
        ip, j = assign.search(block, 1)
        norms = np.linalg.norm(block, axis=1)
        lists = np.searchsorted(edges, norms, side="right") * nlist + j[:, 0]
        add_preassigned(ivf, block, lists.astype(np.int64))
        count += np.bincount(lists, minlength=L)
        np.maximum.at(rmax, lists, norms)
        cos += np.bincount(lists, ip[:, 0] / np.maximum(norms * cnorm[j[:, 0]], 1e-30), minlength=L)
    alpha = np.clip(cos / np.maximum(count, 1), -1.0, 1.0)
    scale = [float(f"{v:.6g}") for v in rmax * alpha]
    spread = [float(f"{v:.6g}") for v in rmax * np.sqrt((1 - alpha**2) / base.dim)
              * np.sqrt(2 * np.log(np.maximum(count, 2)))]
    index.set_list_order(ListOrder(centroids, B, scale, spread, list_sizes(index)))
    return index, {"norm_buckets": B, "norm_edges": [float(f"{v:.6g}") for v in edges],
                   "list_order": {"scale": scale, "spread": spread}}


def list_sizes(index: SketchIndex) -> np.ndarray:
    """Rows per inverted list of an unsharded CPU IVF index (L,) int64."""
    ivf = index._ivf()[0]
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def _seed_kmeans(index: SketchIndex, seed: int) -> None:
    """Make faiss's k-means (coarse quantiser, and PQ codebooks) use `seed`: the same build, the same lists."""
    import faiss

    for ivf in index._ivf():
        ivf.cp.seed = int(seed)
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        if pq is not None:
            pq.cp.seed = int(seed)


def open_first_stage(info: dict, sketches: list[Any], dim: int, path: Any = None, use_gpu: bool | None = None
                     ) -> SketchIndex:
    """The first stage of a loaded index version, as its manifest's "index" section `info` describes it.

    Args:
        info: the manifest's "index" section (from `build_first_stage`).
        sketches: the shards' sketch arrays (n_s, D), in row order (memory maps).
        dim: D.
        path: the stored index file, for a stored (approximate) kind.
        use_gpu: as in SketchIndex. On several GPUs the index is sharded over all of them (IndexShards).

    Raises:
        IndexCorruptError: the stored file holds another kind, dimension or row count than the manifest says.
    """
    from .ann import ConcatRows, gpu_count

    if not info.get("stored"):
        index = SketchIndex.build(sketches, dim, kind=info["kind"], use_gpu=use_gpu)
    else:
        index = SketchIndex.load(path, use_gpu=use_gpu)
        rows = sum(int(s.shape[0]) for s in sketches)
        if index.kind != info["kind"] or index.dim != dim or index.ntotal != rows:
            raise IndexCorruptError(f"{path}: holds a {index.kind} index of {index.ntotal} rows x {index.dim} dims, "
                                    f"the manifest says {info['kind']} with {rows} x {dim}; rebuild the index")
        index.attach_vectors(ConcatRows(sketches))
        index.nprobe = int(info["nprobe"])
        if info.get("norm_buckets", 1) > 1:
            import faiss

            cpu = faiss.extract_index_ivf(index._cpu_index())
            nlist = int(info["nlist"])
            index.set_list_order(ListOrder(cpu.quantizer.reconstruct_n(0, nlist), int(info["norm_buckets"]),
                                           info["list_order"]["scale"], info["list_order"]["spread"],
                                           [cpu.invlists.list_size(i) for i in range(cpu.nlist)]))
        index.set_direction_nprobe(**info.get("nprobe_by_direction", {}))
        index.refine = int(info.get("refine", 1))
    if index.device != "cpu" and gpu_count() > 1:
        index.shard()
    return index
