"""A soak of the service with the default model: N sequential TopK queries; prints one JSON object.

A `forvalue serve` process (as deployed; see bench_serve.py) serves an index of the example corpus built
with the model; one client sends --queries TopK calls back to back (the example's valuation rows in turn,
most and least alternating) and reads the server's resident memory after every 5% of them. The verdict
mirrors tests/reliability/test_soak.py (tiny model, 2,000 queries): no errors, and memory growth below 5%
from the quarter mark to the end. A reading varies by a few percent with the temporaries of the call just
answered, so growth compares medians of five readings: those from 25% to 45% of the queries, and the
last five (80% to 100%).

    python tools/soak.py [--queries 10000] [--model DIR|FILE.gguf] [--index DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import example_rows, start_server  # noqa: E402

MAX_GROWTH_PCT = 5.0


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (psutil when installed, else /proc/<pid>/status)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000, help="sequential TopK calls")
    ap.add_argument("--model", default=None, help="HF directory or .gguf [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--index", default=None, help="an index built with --model [default: built here, example data]")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100, help="first-stage candidates re-ranked exactly")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `forvalue serve` option (repeatable)")
    args = ap.parse_args()
    if args.queries < 20:
        ap.error("--queries must be at least 20 (memory is read after every 5% of them)")

    from forvalue.client.client import InfluenceClient, ServerError

    train, queries = example_rows()
    tmp = tempfile.TemporaryDirectory()
    index_dir = args.index
    if index_dir is None:
        from forvalue.indexer.build import build_index
        from forvalue.indexer.config import BuildConfig
        from forvalue.indexer.model import load_model

        index_dir = os.path.join(tmp.name, "index")
        build_index(index_dir, train, load_model(args.model), BuildConfig())
    checkpoints = {round(j * args.queries / 20) for j in range(1, 21)}  # 5%, 10%, ..., 100% of the queries
    rss: dict[int, float] = {}
    errors: list[str] = []
    proc, address = start_server(index_dir, args.model, ["--batch-wait-ms", "0", *args.serve_arg])
    try:
        with InfluenceClient(address, timeout=600) as client:
            client.search([queries[0]], k=args.k)  # warm-up: the first call pays lazy loads
            rss[0] = rss_mb(proc.pid)
            t0 = time.perf_counter()
            for i in range(1, args.queries + 1):
                try:
                    client.search([queries[i % len(queries)]], k=args.k, direction=("most", "least")[i % 2],
                                  rerank=args.rerank)
                except ServerError as exc:
                    errors.append(f"{i}: {exc}")
                if i in checkpoints:
                    rss[i] = rss_mb(proc.pid)
            seconds = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
        tmp.cleanup()
    marks = sorted(rss)[1:]  # the 20 readings after the warm-up one
    start, end = statistics.median(rss[i] for i in marks[4:9]), statistics.median(rss[i] for i in marks[-5:])
    growth = (end / start - 1) * 100
    print(json.dumps({
        "model": args.model or "default", "index_rows": len(train) if args.index is None else None,
        "queries": args.queries, "errors": len(errors), "first_errors": errors[:5],
        "seconds": round(seconds, 1), "queries_per_second": round(args.queries / seconds, 2),
        "rss_mb": {str(i): round(mb, 1) for i, mb in rss.items()},
        "growth_pct": round(growth, 2), "growth_from_query": marks[4], "rss_mb_start": round(start, 1),
        "rss_mb_end": round(end, 1),
        "ok": not errors and growth < MAX_GROWTH_PCT,
        "targets": {"errors": 0, "growth_pct_max": MAX_GROWTH_PCT},
    }))


if __name__ == "__main__":
    main()
