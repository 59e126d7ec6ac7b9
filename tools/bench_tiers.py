"""The storage tiers of the re-rank data side by side (float32, float16, recompute), in one run; prints one JSON object.

Builds three indexes over the same training rows with the same sketch maps (`--rerank-store float32`, `float16`,
`recompute`) and reports per tier: bytes per sample on disk by role (`build.storage_summary`), and the p50 / p95
search time of one query (k, --rerank candidates, most and least, from the same query features, percentiles off:
the recompute tier has none; the tiers alternate per query so the machine's noise hits them alike), next to the
query's own forward pass. Against the float32 tier's answers: the share of its top-k each tier returns (mean over
queries and directions), and the largest score difference on the rows either answer holds (each row scored by both
tiers), absolute and relative to the largest |score| of the float32 answers.

    python tools/bench_tiers.py --data ../shared/eval/datainf/grammars --train-rows 900 --queries 100 \\
        --latency-queries 10 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch

TIERS = ("float32", "float16", "recompute")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF directory or .gguf [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--data", required=True, help="a DataInf prefix (DIR/NAME) or a file with a split column")
    ap.add_argument("--tokens", default="response", choices=("response", "all"))
    ap.add_argument("--train-rows", type=int, default=900, help="first training rows indexed")
    ap.add_argument("--queries", type=int, default=100, help="valuation rows compared (float16 against float32)")
    ap.add_argument("--latency-queries", type=int, default=10, help="of them, the ones timed on every tier")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--tiers", default=",".join(TIERS),
                    help="tiers compared, float32 first (e.g. float32,float16 for the answers alone)")
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()
    args.tiers = tuple(args.tiers.split(","))
    if args.tiers[0] != "float32" or not set(args.tiers) <= set(TIERS):
        ap.error(f"--tiers: float32 first, then any of {TIERS[1:]}, got {','.join(args.tiers)!r}")
    return args


def build_tiers(folder: str, train, lm, tokens: str, tiers: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """One index per tier in `folder`, all with the float32 build's sketch maps (the same first stage) →
    (tier → opened Index, tier → build seconds, tier → storage_summary)."""
    from forvalue.indexer.build import build_index, storage_summary
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.index import Index
    from forvalue.indexer.sketch import MAP_FILES, Sketcher
    from forvalue.indexer.store import IndexRoot

    idx, build_s, storage = {}, {}, {}
    maps = None
    for tier in tiers:
        root = f"{folder}/{tier}"
        t0 = time.perf_counter()
        build_index(root, train, lm, BuildConfig(tokens=tokens, rerank_dtype=tier), maps=maps)
        build_s[tier] = round(time.perf_counter() - t0, 1)
        if maps is None:
            with IndexRoot(root).load() as v:
                maps = Sketcher.from_arrays({n: np.array(v.global_array(n)) for n in MAP_FILES},
                                            v.manifest["sketch"]["buckets"])
        idx[tier] = Index.open(root, lm)
        storage[tier] = storage_summary(idx[tier].manifest)
    return idx, build_s, storage


def main() -> None:
    args = parse_args()
    tiers_run = args.tiers
    from forvalue.indexer.data import load_eval_sets
    from forvalue.indexer.model import load_model

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    valuation, train = load_eval_sets(args.data)
    train, valuation = train[: args.train_rows], valuation[: args.queries]
    tmp = tempfile.TemporaryDirectory()
    idx, build_s, storage = build_tiers(tmp.name, train, lm, args.tokens, tiers_run)

    times = {t: [] for t in tiers_run}
    forward = []
    overlap = {t: [] for t in tiers_run[1:]}
    max_abs = {t: 0.0 for t in tiers_run[1:]}
    max_rel = {t: 0.0 for t in tiers_run[1:]}
    ref = idx["float32"]
    for qi, q in enumerate(valuation):
        t0 = time.perf_counter()
        f = ref.encode([q])
        forward.append(time.perf_counter() - t0)
        timed = qi < args.latency_queries
        for d in ("most", "least"):
            answers = {}
            for tier in tiers_run if timed else [t for t in tiers_run if t != "recompute"]:
                t0 = time.perf_counter()
                answers[tier] = idx[tier].search([], args.k, d, args.rerank, features=f, calibrate=False)
                if timed:
                    times[tier].append(time.perf_counter() - t0)
            base = answers["float32"].hits
            scale = max(abs(h.score) for h in base)
            for tier, r in answers.items():
                if tier == "float32":
                    continue
                overlap[tier].append(len({h.row for h in r.hits} & {h.row for h in base}) / len(base))
                rows = np.array(sorted({h.row for h in r.hits} | {h.row for h in base}), dtype=np.int64)
                exact = ref.score_rows(f, rows)[0].double()  # float32's values of every row of either answer
                if tier == "float16":  # ... against float16's values of the same rows
                    diff = float((idx[tier].score_rows(f, rows)[0].double() - exact).abs().max())
                else:  # the recompute tier's own scores of its hits
                    at = {row: j for j, row in enumerate(rows.tolist())}
                    diff = max(abs(h.score - float(exact[at[h.row]])) for h in r.hits)
                max_abs[tier] = max(max_abs[tier], diff)
                max_rel[tier] = max(max_rel[tier], diff / scale)
    tmp.cleanup()

    def ms(xs, p):
        return round(float(np.percentile(xs, p)) * 1000, 1)

    tiers = {}
    for tier in tiers_run:
        s = storage[tier]
        tiers[tier] = {
            "rerank_bytes_per_sample": s["rerank_bytes_per_sample"],
            "total_bytes_per_sample": round(s["total_bytes"] / ref.n, 1),
            "first_stage_bytes_per_sample": s["first_stage_bytes_per_sample"],
            "build_seconds": build_s[tier],
            "search_p50_ms": ms(times[tier], 50), "search_p95_ms": ms(times[tier], 95),
            "search_p50_vs_forward": round(statistics.median(times[tier]) / statistics.median(forward), 2),
        }
        if tier != "float32":
            tiers[tier] |= {"top_k_overlap_with_float32": round(float(np.mean(overlap[tier])), 4),
                            "answers_compared": len(overlap[tier]),
                            "max_abs_score_difference": float(f"{max_abs[tier]:.4g}"),
                            "max_relative_score_difference": float(f"{max_rel[tier]:.4g}")}
    print(json.dumps({
        "model": lm.name, "data": args.data, "tokens": args.tokens, "train_rows": ref.n,
        "scored_tokens_per_sample": round(ref.shape()["row_tokens"], 1), "queries": len(valuation),
        "latency_queries": min(args.latency_queries, len(valuation)), "k": args.k, "rerank": args.rerank,
        "threads": torch.get_num_threads(), "query_forward_p50_ms": ms(forward, 50), "tiers": tiers,
    }))


if __name__ == "__main__":
    main()
