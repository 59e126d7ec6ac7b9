"""Service latency and throughput against a bare forward pass, in one run; prints one JSON object.

A `forvalue serve` process (its own process, as deployed) serves an index of the example corpus built
with the same model. Then, in this order:

bare        p50 of model(input_ids) over each query's tokens (prompt + response, logits included), in
            this process while the server idles: the physical floor of answering a query;
topk        p50 latency of single TopK calls (k = 10, --rerank 100 candidates), sequential, exact scores
            (the default) and certified scores (`--scores certified`, indexer/certify.py), the two modes and
            the bare passes alternating over the same queries;
certified   how often the certified answer equals the exact one (same set, same order), what it proves
            (set certified, ranks certified), whether any claim is wrong against the exact answer, the
            intervals' widths relative to the score, and the candidates it scored exactly;
sequential  queries/s of one client calling TopK back to back;
concurrent  queries/s of `--clients` clients (threads, one channel each) calling TopK at once, which the
            server batches into shared forward passes; exact, then certified;
limit       queries/s of bare batched forward passes over the same queries, sorted by length (least padding),
            with the logits of the last position only (the least head work any answer needs), at the fastest
            of the batch sizes 4, 8, 16, ... `--clients` (`forward_limit_batch`): the machine's compute
            limit, what a server could at best serve.

Targets (issues 4, 20): topk p50 ≤ 1.5 × bare p50 (exact), ≤ 1.3 × (certified); concurrent ≥ 3 ×
sequential; concurrent ≥ 0.8 × the limit; zero failed requests.

    python tools/bench_serve.py --json [--model DIR|FILE.gguf] [--index DIR] [--clients 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import example_rows, forward_limit_qps, start_server  # noqa: E402


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def certified_agreement(pairs: list) -> dict:
    """How certified answers compare with the exact answers to the same queries: [(exact, certified)]
    SearchResults → shares of same set / same order / set certified / ranks certified, wrong claims (a
    certified set or rank the exact answer contradicts; an interval missing an exact score), and the
    intervals' widths relative to |score| (median, p90)."""
    same_set = same_order = set_ok = ranks = hits = wrong = outside = 0
    widths, scored = [], []
    for ex, ce in pairs:
        want = [h.row for h in ex.hits]
        got = [h.row for h in ce.hits]
        exact_of = {h.row: h.score for h in ex.hits}
        same_set += set(got) == set(want)
        same_order += got == want
        set_ok += bool(ce.set_certified)
        if ce.set_certified and set(got) != set(want):
            wrong += 1
        for r, h in enumerate(ce.hits):
            hits += 1
            ranks += bool(h.rank_certified)
            if h.rank_certified and (r >= len(want) or want[r] != h.row):
                wrong += 1
            if h.row in exact_of:
                s = exact_of[h.row]
                tol = 1e-5 * max(1.0, abs(s))  # the exact answer's own float32 rounding
                outside += not (h.score_low - tol <= s <= h.score_high + tol)
            widths.append((h.score_high - h.score_low) / max(abs(h.score), 1e-12))
        scored.append(ce.exact_scored or 0)
    n = max(len(pairs), 1)
    widths.sort()
    return {"queries": len(pairs), "same_set": round(same_set / n, 3), "same_order": round(same_order / n, 3),
            "set_certified": round(set_ok / n, 3), "ranks_certified": round(ranks / max(hits, 1), 3),
            "wrong_claims": wrong, "exact_scores_outside_interval": outside,
            "width_rel_median": round(statistics.median(widths), 4) if widths else None,
            "width_rel_p90": round(widths[int(0.9 * (len(widths) - 1))], 4) if widths else None,
            "exact_scored_mean": round(statistics.mean(scored), 2) if scored else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF directory or .gguf [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--index", default=None, help="an index built with --model [default: built here, example data]")
    ap.add_argument("--tokens", default="response", choices=["response", "all"])
    ap.add_argument("--rows", type=int, default=0, help="index only the first ROWS example training rows (0 = all)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=48, help="sequential TopK calls (and bare passes)")
    ap.add_argument("--per-client", type=int, default=6, help="TopK calls per concurrent client")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100, help="first-stage candidates re-ranked exactly")
    ap.add_argument("--exact-budget", type=int, default=None,
                    help="certified answers: candidates scored exactly at most [default: the library's]")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `forvalue serve` option (repeatable)")
    ap.add_argument("--device", default="cpu", help="torch device of the model: the bare passes, the index build "
                                                   "and the server")
    ap.add_argument("--dtype", default="auto", help="precision of the forward pass (as --dtype of the commands)")
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()

    from forvalue.client.client import InfluenceClient, ServerError
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.features import ForwardConfig
    from forvalue.indexer.forward import encode
    from forvalue.indexer.model import load_model
    from forvalue.indexer.results import DEFAULT_EXACT_BUDGET

    budget = DEFAULT_EXACT_BUDGET if args.exact_budget is None else args.exact_budget

    torch.set_grad_enabled(False)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(lm.model.parameters()).device
    train, queries = example_rows()
    if args.rows:
        train = train[: args.rows]
    tmp = tempfile.TemporaryDirectory()
    index_dir = args.index
    build_s = None
    if index_dir is None:
        index_dir = os.path.join(tmp.name, "index")
        t0 = time.perf_counter()
        build_index(index_dir, train, lm, BuildConfig(tokens=args.tokens))
        build_s = time.perf_counter() - t0
    proc, address = start_server(index_dir, args.model,
                                 ["--device", args.device, "--dtype", args.dtype, *args.serve_arg])
    try:
        fwd = ForwardConfig(tokens=args.tokens)
        ids = [torch.tensor([encode(lm.tokenizer, p, r, fwd).ids], device=device) for p, r in queries]
        qs = [queries[i % len(queries)] for i in range(args.requests)]
        with InfluenceClient(address, timeout=600) as c:
            c.search([qs[0]], k=args.k)  # warm-up (first call pays lazy loads)
            c.search([qs[0]], k=args.k, scores="certified", exact_budget=budget)
            lm.model(input_ids=ids[0], use_cache=False)
            bare, topk, cert, pairs = [], [], [], []
            for rep in range(2):  # alternate, so slow phases of the shared machine hit all three
                js = [(rep * (args.requests // 2) + i) % len(queries) for i in range(args.requests // 2)]
                for j in js:
                    t0 = time.perf_counter()
                    lm.model(input_ids=ids[j], use_cache=False)
                    bare.append(time.perf_counter() - t0)
                exact = []
                for j in js:
                    t1 = time.perf_counter()
                    exact.append(c.search([queries[j]], k=args.k, rerank=args.rerank))
                    topk.append(time.perf_counter() - t1)
                for j, ex in zip(js, exact):
                    t1 = time.perf_counter()
                    ce = c.search([queries[j]], k=args.k, rerank=args.rerank, scores="certified", exact_budget=budget)
                    cert.append(time.perf_counter() - t1)
                    pairs.append((ex, ce))
            seq_qps = len(topk) / sum(topk)
            cert_seq_qps = len(cert) / sum(cert)
        failed: list[str] = []

        def concurrent(scores: str) -> float:
            done = [0]
            lock = threading.Lock()

            def client_loop(ci: int) -> None:
                with InfluenceClient(address, timeout=600) as cc:
                    for r in range(args.per_client):
                        q = queries[(ci * args.per_client + r) % len(queries)]
                        try:
                            cc.search([q], k=args.k, rerank=args.rerank, scores=scores, exact_budget=budget)
                            with lock:
                                done[0] += 1
                        except ServerError as exc:
                            with lock:
                                failed.append(str(exc))

            threads = [threading.Thread(target=client_loop, args=(ci,)) for ci in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return done[0] / (time.perf_counter() - t0)

        conc_qps = concurrent("exact")
        cert_conc_qps = concurrent("certified")
        limit_qps, limit_batch = forward_limit_qps(lm.model, ids, args.clients, device)
    finally:
        proc.terminate()
        proc.wait(60)
        tmp.cleanup()
    out = {
        "device": str(device), "dtype": lm.dtype_name, "model": lm.name, "tokens": args.tokens, "threads": torch.get_num_threads(),
        "index_rows": len(train) if args.index is None else None, "index_build_seconds":
            None if build_s is None else round(build_s, 1), "k": args.k,
        "bare_forward_p50_ms": round(p50(bare) * 1000, 1), "topk_p50_ms": round(p50(topk) * 1000, 1),
        "topk_p90_ms": round(statistics.quantiles(topk, n=10)[-1] * 1000, 1),
        "latency_ratio": round(p50(topk) / p50(bare), 3),
        "certified_topk_p50_ms": round(p50(cert) * 1000, 1), "exact_budget": budget,
        "certified_latency_ratio": round(p50(cert) / p50(bare), 3),
        "certified": certified_agreement(pairs),
        "sequential_qps": round(seq_qps, 2), "concurrent_qps": round(conc_qps, 2), "clients": args.clients,
        "throughput_ratio": round(conc_qps / seq_qps, 2),
        "certified_sequential_qps": round(cert_seq_qps, 2), "certified_concurrent_qps": round(cert_conc_qps, 2),
        # the machine's limit: bare forward passes over the same queries in batches of `clients`, longest first,
        # last position's logits only (what a server that batches perfectly and does nothing else could serve)
        "forward_limit_qps": round(limit_qps, 2), "forward_limit_batch": limit_batch,
        "throughput_vs_forward_limit": round(conc_qps / limit_qps, 3),
        "certified_throughput_vs_forward_limit": round(cert_conc_qps / limit_qps, 3),
        "requests": len(topk) + len(cert) + 2 * args.clients * args.per_client, "failed": len(failed),
        "failures": failed[:5],
        "targets": {"latency_ratio_max": 1.5, "certified_latency_ratio_max": 1.3, "throughput_ratio_min": 3.0,
                    "throughput_vs_forward_limit_min": 0.8, "failed": 0},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
