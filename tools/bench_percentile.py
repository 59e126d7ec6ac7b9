"""How far the displayed percentile of search hits is from the exact one; prints one JSON object.

For each valuation row (one query each) and direction, every hit's `Hit.percentile` against the exact
percentile of its row among all live rows, from exact For-Value of every row (`Index.score_rows`):

- "share lower": #{j != i : S_j < S_i} / (n - 1), the definition `Hit.percentile` follows now
  (indexer/calibration.py; `rank` writes the same number);
- "mid-rank": (#{j : S_j < S_i} + #{j : S_j = S_i} / 2) / n, the definition it had before.

Reports the mean and max absolute error against each, the errors by rank (1..5), the displayed and exact
percentiles of the first query's top 5 (most), the interval widths (0 when exact), the p50 search time with
and without calibration (same features), and the time to bound CALIBRATION_ROWS rows (the largest index whose
percentiles are exact; the index's rows repeated to that many). On the example data (10 sentence transformations, 240 training rows)
or `--index/--valuation`:

    python tools/bench_percentile.py --json [--model M] [--index DIR --valuation FILE] [--queries 20]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time

import numpy as np

from common import benchmark_parser, open_benchmark


def exact_percentiles(values: np.ndarray, row: int) -> tuple[float, float]:
    """(share lower, mid-rank) of row `row` among `values` (n,), by counting."""
    n = values.size
    s = values[row]
    lower = int(np.sum(values < s))
    equal = int(np.sum(values == s))
    return lower / max(n - 1, 1), (lower + 0.5 * equal) / n


def main() -> None:
    ap = benchmark_parser(__doc__.splitlines()[0], queries=20)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    lm, _, idx, queries = open_benchmark(args, f"{tmp.name}/index")
    queries = queries[: args.queries]
    live = np.setdiff1d(np.arange(idx.n), idx.deleted.rows)
    err_share, err_mid, widths, t_cal, t_plain = [], [], [], [], []
    by_rank: dict[int, list[float]] = {r: [] for r in range(1, 6)}
    first = None
    for qi, q in enumerate(queries):
        f = idx.encode([(q.prompt, q.response)])
        values = idx.score_rows(f, live)[0].double().numpy()
        pos = {int(r): i for i, r in enumerate(live.tolist())}
        for d in ("most", "least"):
            t0 = time.perf_counter()
            res = idx.search([], args.k, d, args.rerank, features=f)
            t_cal.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            idx.search([], args.k, d, args.rerank, features=f, calibrate=False)
            t_plain.append(time.perf_counter() - t0)
            for h in res.hits:
                share, mid = exact_percentiles(values, pos[h.row])
                err_share.append(abs(h.percentile - share))
                err_mid.append(abs(h.percentile - mid))
                if h.rank in by_rank:
                    by_rank[h.rank].append(abs(h.percentile - share))
                low, high = getattr(h, "percentile_low", None), getattr(h, "percentile_high", None)
                widths.append(0.0 if low is None else high - low)
            if qi == 0 and d == "most":
                first = {"shown": [round(h.percentile, 4) for h in res.hits[:5]],
                         "exact_share_lower": [round(exact_percentiles(values, pos[h.row])[0], 4)
                                               for h in res.hits[:5]]}
    # the cost of exactness: certified bounds of CALIBRATION_ROWS rows (the index's rows repeated to that many)
    from forvalue.indexer.config import CALIBRATION_ROWS

    f = idx.encode([(queries[0].prompt, queries[0].response)])
    probs = idx._cpu_head.probs(f.h, f.lse)
    rows = np.resize(live, CALIBRATION_ROWS)
    bound_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        idx.value_bounds(f, rows, probs)
        bound_s.append(time.perf_counter() - t0)
    tmp.cleanup()
    p50 = statistics.median
    print(json.dumps({
        "model": lm.name, "index_rows": int(live.size), "queries": len(queries), "k": args.k,
        "hits": len(err_share),
        "abs_error_vs_share_lower_mean": round(float(np.mean(err_share)), 4),
        "abs_error_vs_share_lower_max": round(float(np.max(err_share)), 4),
        "abs_error_vs_mid_rank_mean": round(float(np.mean(err_mid)), 4),
        "abs_error_vs_mid_rank_max": round(float(np.max(err_mid)), 4),
        "abs_error_vs_share_lower_by_rank_max": {r: round(float(np.max(v)), 4) for r, v in by_rank.items() if v},
        "first_query_top5_most": first,
        "interval_width_max": round(float(np.max(widths)), 4),
        "search_p50_ms": round(p50(t_cal) * 1000, 1), "search_uncalibrated_p50_ms": round(p50(t_plain) * 1000, 1),
        "bounds_rows": CALIBRATION_ROWS, "bounds_ms_min_of_3": round(min(bound_s) * 1000, 1),
    }))


if __name__ == "__main__":
    main()
