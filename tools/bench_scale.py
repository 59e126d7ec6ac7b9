"""First-stage scaling: flat against IVF-SQ8 / IVF-PQ on synthetic sketches; prints one JSON object.

For each size n (default 100,000; `--sizes 100000,1000000` for the 1M run) and sketch dimension D
(default 4096 = rank 4 x 1024 buckets, the default sketch): synthetic sketches, built chunk by chunk into
a np.memmap under --workdir (never all in process memory; deleted at the end unless --keep), then

- flat: exact search. Built as faiss IndexFlatIP when n·D·4 bytes fit --flat-max-gb, else measured as
  the chunked exact scan `SketchIndex` falls back to (numpy q @ Xᵀ over the memory-mapped rows).
- ivf-sq8, ivf-pq: `firststage.build_first_stage` (trained on a seeded sample, nprobe chosen as the
  smallest power of two reaching --min-recall, refined by exact inner products of refine·k candidates
  read from the memory map), exactly as an index build does.

Reported per kind: build seconds (train, add, recall measurement), bytes per sample (the serialized
FAISS index / n; flat: 4·D), query latency p50/p95 of single queries for k = --k-candidates (the
default re-ranking candidate count) in each direction, and per direction (`directions.most|least`)
recall@10 against flat (`recall_at_10`, held-out training sketches as queries, as measured at build
time), the share of the rows whose codes a query scans (`scanned_share`) and nprobe. `--norm-buckets 1`
measures plain lists; `--real IDX` adds the same measurement on the sketches of an index built here
(key "real"). Then the cost model
extrapolated to --target samples: memory per shard, shards needed for --host-gb of index memory per
host, and per-shard latency (scaled by the rows a query scans, see `extrapolate`).

Synthetic rows: --clusters Gaussian centres in D dims (unit variance per dimension), each row a centre
plus Gaussian noise of --noise standard deviation, times a log-normal norm (sigma 0.5), so that rows
differ in length as real sketches do (IVF with inner product is weakest on large-norm rows). Real sketch
corpora differ; measure on them with `forvalue index build --index-kind ivf-sq8`, whose manifest
publishes the same recall numbers.

    python tools/bench_scale.py --json                        # 100k x 4096, a few minutes on 2 cores
    python tools/bench_scale.py --json --sizes 100000,1000000 # + 1M (16 GB memmap on disk; ~15-25 min)
    python tools/bench_scale.py --json --sizes 1000000 --kinds ivf-sq8 --real IDX  # + a real index's sketches
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

BLOCK = 8192  # rows generated (and written) at a time


def make_sketches(path: str, n: int, dim: int, clusters: int, noise: float, seed: int) -> np.memmap:
    """n synthetic sketches (n, dim) float32 written to a memmap at `path` one block at a time."""
    rng = np.random.default_rng([seed, dim, clusters])
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, BLOCK):
        r = np.random.default_rng([seed, a])
        b = min(a + BLOCK, n)
        rows = centres[r.integers(0, clusters, b - a)] + noise * r.standard_normal((b - a, dim), dtype=np.float32)
        rows *= np.exp(0.5 * r.standard_normal((b - a, 1))).astype(np.float32) / math.sqrt(2 * dim)
        x[a:b] = rows
    x.flush()
    return np.load(path, mmap_mode="r")


def latencies(index, queries: np.ndarray, k: int) -> dict:
    """p50 / p95 milliseconds of single-query searches, per direction."""
    out = {}
    for direction in ("most", "least"):
        times = []
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None, :], k, direction)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[direction] = {"p50_ms": round(statistics.median(times), 3),
                          "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3)}
    return out


def flat_scan_latency(x: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """Latency of the exact chunked scan (the flat path for an index too large for one faiss flat)."""
    from forvalue.indexer.ann import chunked_topk

    rows = max(1, (64 << 20) // (4 * x.shape[1]))
    times = []
    for q in queries:
        t0 = time.perf_counter()
        chunked_topk(q[None, :], ((a, np.asarray(x[a : a + rows])) for a in range(0, x.shape[0], rows)), k)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    one = {"p50_ms": round(statistics.median(times), 3), "p95_ms": round(times[-1], 3)}
    return {"most": one, "least": one}  # the same scan: least is the scan of −q


def bench_size(x: np.ndarray, args, log) -> dict:
    import faiss

    from forvalue.indexer.ann import SketchIndex
    from forvalue.indexer.config import FirstStageConfig
    from forvalue.indexer.errors import RecallTooLowError
    from forvalue.indexer.firststage import build_first_stage, sample_rows

    n, dim = x.shape
    qrows = sample_rows(n, args.latency_queries, 7)
    queries = np.ascontiguousarray(x[qrows])
    out: dict = {"n": n, "dim": dim}
    flat_bytes = n * dim * 4
    if flat_bytes <= args.flat_max_gb * 2**30:
        t0 = time.perf_counter()
        flat = SketchIndex.from_array(x, use_gpu=False)
        build = time.perf_counter() - t0
        out["flat-ip"] = {"how": "faiss IndexFlatIP in memory", "build_seconds": round(build, 2),
                          "bytes_per_sample": dim * 4, "latency": latencies(flat, queries, args.k_candidates),
                          "recall": {"most": 1.0, "least": 1.0}}
        del flat
    else:
        out["flat-ip"] = {"how": "exact chunked scan of the memory map (too large for --flat-max-gb in memory)",
                          "build_seconds": 0.0, "bytes_per_sample": dim * 4,
                          "latency": flat_scan_latency(x, queries[: max(3, len(queries) // 10)], args.k_candidates),
                          "recall": {"most": 1.0, "least": 1.0}}
    log(f"n={n}: flat {out['flat-ip']['latency']['most']}")
    for kind in args.kinds:
        cfg = FirstStageConfig(kind=kind, pq_m=args.pq_m, refine=args.refine, min_recall=args.min_recall,
                               recall_queries=args.recall_queries, seed=0, norm_buckets=args.norm_buckets)
        t0 = time.perf_counter()
        try:
            index, info = build_first_stage(x, cfg, use_gpu=False)
        except RecallTooLowError as exc:
            out[kind] = {"refused": str(exc), "build_seconds": round(time.perf_counter() - t0, 2)}
            log(f"n={n}: {kind} refused: {exc}")
            continue
        build = time.perf_counter() - t0
        with tempfile.TemporaryFile(dir=args.workdir) as f:
            index.write(f)
            size = f.tell()
        out[kind] = {"build_seconds": round(build, 2), "train_seconds": info["train_seconds"],
                     "add_seconds": info["add_seconds"], "recall_seconds": info["recall_seconds"],
                     "nlist": info["nlist"], "nprobe": info["nprobe"], "refine": info["refine"],
                     "nprobe_by_direction": info["nprobe_by_direction"],
                     "bytes_per_sample": round(size / n, 1), "index_bytes": size,
                     "recall": {"k": info["recall"]["k"], "most": info["recall"]["most"],
                                "least": info["recall"]["least"], "queries": info["recall"]["queries"]},
                     "recall_by_nprobe": info["recall"]["by_nprobe"],
                     "norm_buckets": info.get("norm_buckets", 1),
                     "directions": {d: {"recall_at_10": info["recall"][d],
                                        "scanned_share": info["recall"]["scanned_share"][d],
                                        "nprobe": info["nprobe_by_direction"][d]} for d in ("most", "least")},
                     "latency": latencies(index, queries, args.k_candidates)}
        if kind == "ivf-pq":
            out[kind]["pq_m"] = args.pq_m
        log(f"n={n}: {kind} {json.dumps({k: out[kind][k] for k in ('build_seconds', 'nprobe', 'recall', 'latency')})}")
        del index
    out["faiss_threads"] = faiss.omp_get_max_threads()
    return out


def bench_real(args, log) -> dict:
    """The first stages over a real index's sketches (--real): its current version's shards, concatenated."""
    import glob

    from forvalue.indexer.ann import ConcatRows

    with open(os.path.join(args.real, "CURRENT")) as f:
        version = f.read().strip()
    paths = sorted(glob.glob(os.path.join(args.real, "versions", os.path.basename(version), "shards", "*",
                                          "sketch.npy")))
    if not paths:
        sys.exit(f"bench_scale: no shards/*/sketch.npy in the current version of {args.real}")
    x = ConcatRows([np.load(p, mmap_mode="r") for p in paths])
    x = np.ascontiguousarray(x[0 : x.shape[0]], dtype=np.float32)
    log(f"real: {x.shape[0]} x {x.shape[1]} sketches from {args.real}")
    out = bench_size(x, args, log)
    out["index"] = args.real
    return out


def extrapolate(results: list[dict], target: int, host_gb: float) -> dict:
    """Memory per shard, shards needed and per-shard latency at `target` samples, per kind.

    Latency scales with the rows whose codes a query scans: n for flat, n·scanned_share for IVF (per
    direction), taking the largest measured size's share as it is (with nlist ≈ √n the
    fraction needed for the same recall usually falls as n grows, so this errs on the slow side). Shards
    run in parallel: the router adds one network round trip and the merge of S top-k lists.
    """
    model = {}
    last = results[-1]
    for kind in [k for k in last if isinstance(last[k], dict) and "latency" in last[k]]:
        r = last[kind]
        bps = r["bytes_per_sample"]
        shards = max(1, math.ceil(target * bps / (host_gb * 2**30)))
        per_shard = math.ceil(target / shards)
        frac = {d: (r["directions"][d]["scanned_share"] if "directions" in r else 1.0) for d in ("most", "least")}
        scale = per_shard / last["n"]
        model[kind] = {"bytes_per_sample": bps, "index_gb_total": round(target * bps / 2**30, 1),
                       "shards": shards, "samples_per_shard": per_shard,
                       "index_gb_per_shard": round(per_shard * bps / 2**30, 1),
                       "scan_fraction": {d: round(f, 4) for d, f in frac.items()},
                       "p50_ms_per_shard": {d: round(r["latency"][d]["p50_ms"] * scale, 1) for d in ("most", "least")}}
    return {"target_samples": target, "host_index_gb": host_gb, "from_n": last["n"], "kinds": model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000", help="comma-separated corpus sizes")
    ap.add_argument("--dim", type=int, default=4096, help="sketch dimension (default 4 x 1024)")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.5, help="per-dimension noise around a centre (centres: 1)")
    ap.add_argument("--kinds", default="ivf-sq8,ivf-pq")
    ap.add_argument("--pq-m", type=int, default=256, help="ivf-pq bytes per row")
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--norm-buckets", type=int, default=4, help="norm buckets of the IVF lists (1 = plain lists)")
    ap.add_argument("--real", default=None, help="also measure on the sketches of this index directory")
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--latency-queries", type=int, default=50)
    ap.add_argument("--k-candidates", type=int, default=100, help="k of the latency queries (the rerank default)")
    ap.add_argument("--flat-max-gb", type=float, default=4.0, help="largest flat index built in memory")
    ap.add_argument("--target", type=int, default=100_000_000)
    ap.add_argument("--host-gb", type=float, default=64.0, help="index memory per host for the cost model")
    ap.add_argument("--workdir", default=None, help="where the memmaps go [default: a temporary directory]")
    ap.add_argument("--keep", action="store_true", help="keep the memmaps")
    ap.add_argument("--json", action="store_true", help="JSON only on stdout (progress on stderr)")
    args = ap.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    sizes = [int(s) for s in args.sizes.split(",")]
    own = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_scale-")
    os.makedirs(args.workdir, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    need = max(sizes) * args.dim * 4
    free = shutil.disk_usage(args.workdir).free
    if need > free - (8 << 30):
        sys.exit(f"bench_scale: the {max(sizes)} x {args.dim} memmap needs {need / 2**30:.1f} GiB, "
                 f"{args.workdir} has {free / 2**30:.1f} GiB free (keeping 8 GiB spare); use a smaller --dim")
    results = []
    t_all = time.perf_counter()
    try:
        for n in sizes:
            path = os.path.join(args.workdir, f"sketches-{n}x{args.dim}.npy")
            t0 = time.perf_counter()
            if os.path.exists(path):
                x = np.load(path, mmap_mode="r")
            else:
                x = make_sketches(path, n, args.dim, args.clusters, args.noise, seed=0)
            log(f"n={n}: sketches ready in {time.perf_counter() - t0:.1f} s ({path})")
            results.append(bench_size(x, args, log))
            del x
            if not args.keep:
                os.remove(path)
        results_real = bench_real(args, log) if args.real else None
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    report = {"machine": {"cpus": os.cpu_count(), "faiss_threads": results[0]["faiss_threads"]},
              "dim": args.dim, "clusters": args.clusters, "noise": args.noise, "k_candidates": args.k_candidates,
              "min_recall": args.min_recall, "refine": args.refine, "sizes": results,
              "cost_model": extrapolate(results, args.target, args.host_gb),
              "seconds": round(time.perf_counter() - t_all, 1)}
    if args.real:
        report["real"] = results_real
    print(json.dumps(report, indent=None if args.json else 2, sort_keys=True))


if __name__ == "__main__":
    main()
