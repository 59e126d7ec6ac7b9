"""Cost of token-level explanations: Index.search with and without explain, same features, alternating.

Builds the example index (as tools/bench_serve.py) unless --index is given; for each query and direction,
times `search(..., explain=0)` and `search(..., explain=P)` on the same features and checks that every
explanation's total equals its hit's score. Prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import numpy as np
import torch

from forvalue.indexer.features import Features, Head
from forvalue.indexer.score import exact_scores

from common import benchmark_parser, open_benchmark


def _double(f, head64):
    """Features in float64, the log-partition recomputed in float64."""
    h = f.h.double()
    return Features(h, f.y, head64.logsumexp(h), f.offsets)


def main() -> None:
    ap = benchmark_parser(__doc__.splitlines()[0], queries=10)
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    lm, _, idx, queries = open_benchmark(args, tmp.name)
    queries = [(s.prompt, s.response) for s in queries]
    head64 = Head.from_model(lm.model, torch.float64)
    plain, explained, worst, tokens, err_score, err_total = [], [], 0.0, [], 0.0, 0.0
    for i, q in enumerate(queries[: args.queries]):
        f = idx.encode([q])
        for d in ("most", "least"):
            t0 = time.perf_counter()
            a = idx.search([], args.k, d, args.rerank, features=f)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = idx.search([], args.k, d, args.rerank, features=f, explain=args.pairs)
            explained.append(time.perf_counter() - t0)
            assert [h.id for h in a.hits] == [h.id for h in b.hits]
            for h in b.hits:
                worst = max(worst, abs(h.explanation.total - h.score) / max(abs(h.score), 1e-9))
                tokens.append((len(h.explanation.query_tokens), len(h.explanation.train_tokens)))
            if i < 2:  # float64 exact scores of the same features: which of the two float32 numbers is closer
                ref = exact_scores(_double(f, head64), _double(idx.candidate_features([h.row for h in b.hits]), head64),
                                   head64).mean(0)
                for h, r in zip(b.hits, ref.tolist()):
                    err_score = max(err_score, abs(h.score - r) / abs(r))
                    err_total = max(err_total, abs(h.explanation.total - r) / abs(r))
    tmp.cleanup()
    extra = statistics.median(explained) - statistics.median(plain)
    print(json.dumps({
        "model": lm.name, "index_rows": idx.n, "queries": min(args.queries, len(queries)), "k": args.k,
        "pairs": args.pairs, "search_p50_ms": round(statistics.median(plain) * 1000, 1),
        "search_explain_p50_ms": round(statistics.median(explained) * 1000, 1),
        "explain_per_hit_ms": round(extra / args.k * 1000, 2),
        "mean_tokens_query_train": [round(float(x), 1) for x in np.mean(tokens, axis=0)],
        "max_relative_total_vs_score": worst,
        "max_relative_error_vs_float64": {"hit_score": err_score, "explanation_total": err_total},
    }))


if __name__ == "__main__":
    main()
