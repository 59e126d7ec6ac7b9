"""Calibrated scores, filters, group-by and deletions on a real model, in one run; prints one JSON object.

On the example data (10 sentence-transformation classes, 240 training rows; `label` is the metadata field
filtered and grouped on) or on `--index/--valuation` (then `--field` names the field):

- calibration: for each query and direction, every hit's percentile (`Hit.percentile`) against its exact
  percentile among all rows (share of the other rows with a strictly lower exact value, from exact For-Value
  of every row): mean and max absolute error (tools/bench_percentile.py looks closer);
  and the cosine of the top hit of each direction.
- filters: a filter on one value of the field, searched with the first stage restricted to the matching
  rows; the answer against brute force (exact top-k of the matching rows), and its p50 search time
  against the unfiltered search's (same features; the two alternate per query).
- group-by: p50 time, and how often the group with the largest total is the query's own class.
- deletions: `delete_samples` of 10 ids on a copy of the index (no model needed) and its time; the
  following searches never return them.

    python tools/bench_answers.py --json [--model M] [--index DIR --valuation FILE --field F] [--queries 30]
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time

import numpy as np

from common import benchmark_parser, open_benchmark


def main() -> None:
    ap = benchmark_parser(__doc__.splitlines()[0])
    ap.add_argument("--field", default="label", help="metadata field to filter and group on")
    args = ap.parse_args()

    from forvalue.indexer.deletion import delete_samples
    from forvalue.indexer.filters import Where, value_key
    from forvalue.indexer.index import Index

    tmp = tempfile.TemporaryDirectory()
    lm, index_dir, idx, queries = open_benchmark(args, f"{tmp.name}/index")
    rng = np.random.default_rng(0)
    queries = [queries[i] for i in sorted(rng.permutation(len(queries))[: args.queries])]
    codes, keys = idx.fields.codes(args.field)
    all_rows = np.arange(idx.n)

    pct_err, top_cos = [], {"most": [], "least": []}
    t_plain, t_filtered, t_group, mismatches, own_group_first = [], [], [], 0, []
    for q in queries:
        f = idx.encode([(q.prompt, q.response)])
        exact = idx.score_rows(f, all_rows)[0].double().numpy()
        for d in ("most", "least"):
            res = idx.search([], args.k, d, args.rerank, features=f)
            for h in res.hits:
                true = np.sum(exact < exact[h.row]) / (exact.size - 1)
                pct_err.append(abs(h.percentile - true))
            top_cos[d].append(res.hits[0].cosine)
        # a filter on the query's own value of the field (or a random one when it has none)
        key = value_key(q.label) if q.label is not None and value_key(q.label) in keys else keys[rng.integers(len(keys))]
        where = Where.of([(args.field, key)])
        allowed = np.flatnonzero(codes == keys.index(key))
        for d in ("most", "least"):
            t0 = time.perf_counter()
            idx.search([], args.k, d, args.rerank, features=f, calibrate=False)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = idx.search([], args.k, d, args.rerank, features=f, where=where, calibrate=False)
            t_filtered.append(time.perf_counter() - t0)
            order = allowed[np.lexsort((allowed, -exact[allowed] if d == "most" else exact[allowed]))][: args.k]
            mismatches += [h.row for h in got.hits] != order.tolist()
        t0 = time.perf_counter()
        groups = idx.group_by([], args.field, k=3, features=f)
        t_group.append(time.perf_counter() - t0)
        if q.label is not None:
            own_group_first.append(groups.groups[0].key == value_key(q.label))

    copy = f"{tmp.name}/copy"
    shutil.copytree(index_dir, copy)
    gone = [str(r["id"]) for r in idx.version.rows(rng.permutation(idx.n)[:10])]
    t0 = time.perf_counter()
    deletion = delete_samples(copy, gone)
    t_delete = time.perf_counter() - t0
    after = Index.open(copy, lm)
    leaked = sum(bool({h.id for h in after.search([(q.prompt, q.response)], k=idx.n, rerank=idx.n).hits} & set(gone))
                 for q in queries[:3])
    tmp.cleanup()
    p50 = statistics.median
    print(json.dumps({
        "model": lm.name, "index_rows": idx.n, "queries": len(queries), "k": args.k, "field": args.field,
        "field_values": len(keys),
        "percentile_abs_error_mean": round(float(np.mean(pct_err)), 4),
        "percentile_abs_error_max": round(float(np.max(pct_err)), 4),
        "top1_cosine_most_mean": round(float(np.mean(top_cos["most"])), 4),
        "top1_cosine_least_mean": round(float(np.mean(top_cos["least"])), 4),
        "filtered_answers": 2 * len(queries), "filtered_mismatches_vs_brute_force": mismatches,
        "filter_selectivity_mean": round(float(np.mean([np.mean(codes == c) for c in range(len(keys))])), 4),
        "search_p50_ms": round(p50(t_plain) * 1000, 1), "filtered_search_p50_ms": round(p50(t_filtered) * 1000, 1),
        "filtered_over_plain": round(p50(t_filtered) / p50(t_plain), 3),
        "group_by_p50_ms": round(p50(t_group) * 1000, 1),
        "group_by_own_class_first": (round(float(np.mean(own_group_first)), 4) if own_group_first else None),
        "delete_10_ids_ms": round(t_delete * 1000, 1), "delete_hidden_rows": deletion.hidden_rows,
        "deleted_ids_returned_afterwards": leaked,
    }))


if __name__ == "__main__":
    main()
