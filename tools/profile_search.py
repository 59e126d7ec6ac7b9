"""Where a TopK answer's time goes: `Index.search` on the example index, profiled (cProfile), against a bare
forward pass of the same queries; prints one JSON object with the top functions by cumulative time.

    python tools/profile_search.py --model random:qwen2.5-0.5b --device cuda --dtype bfloat16 --json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time

import torch

from common import example_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--scores", default="exact", choices=["exact", "certified"], help="the answer mode profiled")
    ap.add_argument("--index", default=None, help="an index of the example data built with --model, opened if it "
                                                  "exists, else built there [default: a temporary one]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.index import Index
    from forvalue.indexer.model import load_model

    torch.set_grad_enabled(False)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    train, queries = example_rows()
    tmp = tempfile.TemporaryDirectory()
    root = args.index or tmp.name
    if not os.path.exists(os.path.join(root, "CURRENT")):
        build_index(root, train, lm, BuildConfig(), progress=False)
    idx = Index.open(root, lm)
    qs = [queries[i % len(queries)] for i in range(args.queries)]
    idx.search([qs[0]], k=args.k, rerank=args.rerank, scores=args.scores)  # warm

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    phases = {"encode": [], "search_given_features": [], "search_total": []}
    for q in qs:
        sync()
        t0 = time.perf_counter()
        f = idx.encode([q])
        sync()
        t1 = time.perf_counter()
        idx.search([], k=args.k, rerank=args.rerank, features=f, scores=args.scores)
        sync()
        t2 = time.perf_counter()
        phases["encode"].append(t1 - t0)
        phases["search_given_features"].append(t2 - t1)
        phases["search_total"].append(t2 - t0)
    prof = cProfile.Profile()
    prof.enable()
    for q in qs:
        idx.search([q], k=args.k, rerank=args.rerank, scores=args.scores)
    sync()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(((v[3], v[0], f"{k[0].split('/')[-1]}:{k[1]}:{k[2]}") for k, v in stats.stats.items()),
                  reverse=True)[: args.top]
    out = {"model": lm.name, "device": args.device, "dtype": lm.dtype_name, "queries": len(qs), "k": args.k,
           "rerank": args.rerank, "scores": args.scores, "threads": torch.get_num_threads(),
           "median_ms": {p: round(sorted(v)[len(v) // 2] * 1000, 2) for p, v in phases.items()},
           "top_cumulative": [{"function": name, "calls": calls, "seconds_per_query": round(cum / len(qs), 5)}
                              for cum, calls, name in rows]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
