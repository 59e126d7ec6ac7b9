"""Where the time of one batcher pass goes, in process: the shared forward pass of `--batch` queries and their
searches, with the training rows' distributions shared by the pass (`Index.row_probs`, as the server does) and
not shared, against bare batched forward passes of the same queries (the limit of bench_serve); prints JSON.

Per answer mode (exact; certified with `--exact-budget`):

limit_ms          bare forward passes of the queries, longest first, last logits only, at the fastest batch size
                  up to `--batch` (common.forward_limit_qps: bench_serve's limit)
encode_ms         the pass's `Index.encode` (forward, plus the head over the queries' scored tokens)
searches_ms       every query's search after it, as the server's pass runs them (one RowProbs, in two phases:
                  `Index.run_pass`) / each alone with its own
rows_tokens       tokens whose distributions the searches computed, and how many they found computed already
pass_vs_limit     limit / (encode + shared searches): the share of the limit a server doing only this reaches

    OMP_NUM_THREADS=1 python tools/bench_pass.py --json [--batch 32] [--exact-budget 0] [--index DIR]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import benchmark_parser, forward_limit_qps, open_benchmark  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def main() -> None:
    ap = benchmark_parser(__doc__.splitlines()[0], queries=32)
    ap.add_argument("--batch", type=int, default=32, help="queries in one pass (bench_serve's --clients)")
    ap.add_argument("--exact-budget", type=int, default=None, help="certified answers: candidates scored exactly "
                                                                   "at most [default: the library's]")
    ap.add_argument("--repeats", type=int, default=2, help="passes per measure (the fastest is kept)")
    args = ap.parse_args()
    from forvalue.indexer.data import Sample
    from forvalue.indexer.forward import encode
    from forvalue.indexer.results import DEFAULT_EXACT_BUDGET

    budget = DEFAULT_EXACT_BUDGET if args.exact_budget is None else args.exact_budget
    tmp = tempfile.TemporaryDirectory()
    lm, _, idx, queries = open_benchmark(args, os.path.join(tmp.name, "index"))
    pairs = [q.as_input() if isinstance(q, Sample) else q for q in queries]
    qs = [pairs[i % len(pairs)] for i in range(args.batch)]
    device = next(lm.model.parameters()).device
    ids = [torch.tensor([encode(lm.tokenizer, p, r, idx.forward).ids], device=device) for p, r in qs]
    idx.search([qs[0]], k=args.k, rerank=args.rerank)  # warm-up: lazy loads

    def searches(features, scores: str, share: bool):
        """Every query's answer: as the server's pass does (one RowProbs, `run_pass`), or each alone."""
        if not share:
            for j in range(features.n):
                idx.answers(features.select([j]), args.k, ["most"], args.rerank, scores=scores, exact_budget=budget)
            return None
        shared = idx.row_probs()
        steps = [idx.answer_steps(features.select([j]), args.k, ["most"], args.rerank, scores=scores,
                                  exact_budget=budget, shared=shared) for j in range(features.n)]
        errors = [e for _, e in idx.run_pass(steps, shared) if e is not None]
        if errors:
            raise errors[0]
        return shared

    out = {"model": lm.name, "threads": torch.get_num_threads(), "batch": args.batch, "index_rows": idx.n,
           "k": args.k, "rerank": args.rerank, "exact_budget": budget}
    qps, out["limit_batch"] = forward_limit_qps(lm.model, ids, args.batch, device, repeats=args.repeats)
    limit_ms = args.batch / qps * 1000
    out["limit_ms"] = round(limit_ms, 1)
    for scores in ("exact", "certified"):
        best = {"encode": float("inf"), "shared": float("inf"), "alone": float("inf")}
        for _ in range(args.repeats):
            ms, f = timed(lambda: idx.encode(qs))
            best["encode"] = min(best["encode"], ms)
            ms, shared = timed(lambda: searches(f, scores, True))
            best["shared"] = min(best["shared"], ms)
            best["alone"] = min(best["alone"], timed(lambda: searches(f, scores, False))[0])
        out[scores] = {
            "encode_ms": round(best["encode"], 1), "searches_ms": round(best["shared"], 1),
            "searches_alone_ms": round(best["alone"], 1),
            "rows_tokens_computed": shared.computed_tokens, "rows_tokens_reused": shared.reused_tokens,
            "pass_vs_limit": round(limit_ms / (best["encode"] + best["shared"]), 3),
            "pass_vs_limit_alone": round(limit_ms / (best["encode"] + best["alone"]), 3),
            "encode_vs_limit": round(limit_ms / best["encode"], 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
