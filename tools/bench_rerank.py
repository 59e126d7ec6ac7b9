"""Pruned against full exact re-ranking, in one run; prints one JSON object.

For each valuation query and direction: `Index.search(prune=True)` (certified bounds rule candidates out,
the rest are scored exactly) and `Index.search(prune=False)` (every candidate scored exactly), from the
same features. Reports whether the answers agree (ids in order, scores to 1e-5 relative), how many
candidates were scored exactly, and the p50 search time of each (the forward pass excluded; the two
alternate per query, so the machine's noise hits both).

    python tools/bench_rerank.py --json [--model M] [--index DIR --valuation FILE] [--rerank 100] [--k 10]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import numpy as np

from common import benchmark_parser, open_benchmark


def main() -> None:
    args = benchmark_parser(__doc__.splitlines()[0]).parse_args()
    tmp = tempfile.TemporaryDirectory()
    lm, _, idx, queries = open_benchmark(args, tmp.name)
    queries = [(s.prompt, s.response) for s in queries[: args.queries]]
    t_pruned, t_full, scored, mismatches, max_rel = [], [], [], 0, 0.0
    for q in queries:
        f = idx.encode([q])
        for d in ("most", "least"):
            t0 = time.perf_counter()
            a = idx.search([], args.k, d, args.rerank, features=f, prune=True)
            t_pruned.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = idx.search([], args.k, d, args.rerank, features=f, prune=False)
            t_full.append(time.perf_counter() - t0)
            sa, sb = np.array([h.score for h in a.hits]), np.array([h.score for h in b.hits])
            rel = float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sb), 1e-9))) if sb.size else 0.0
            max_rel = max(max_rel, rel)
            mismatches += [h.id for h in a.hits] != [h.id for h in b.hits] or rel > 1e-5
            scored.append(a.exact_scored)
    tmp.cleanup()
    print(json.dumps({
        "model": lm.name, "index_rows": idx.n, "rerank_top": idx.rerank_top, "queries": len(queries),
        "answers": len(scored), "k": args.k, "candidates": min(args.rerank, idx.n),
        "mismatches": mismatches, "max_relative_score_difference": max_rel,
        "exact_scored_mean": round(float(np.mean(scored)), 2), "exact_scored_max": int(np.max(scored)),
        "pruned_search_p50_ms": round(statistics.median(t_pruned) * 1000, 1),
        "full_search_p50_ms": round(statistics.median(t_full) * 1000, 1),
        "speedup": round(statistics.median(t_full) / statistics.median(t_pruned), 2),
    }))


if __name__ == "__main__":
    main()
