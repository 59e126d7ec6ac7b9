"""Benchmark exact For-Value scoring at realistic sizes on synthetic features; prints one JSON object.

The features have the shapes of a real model (default: SmolLM2-135M, d = 576, |V| = 49,152) and a
realistic peaked next-token distribution, so time and peak memory are those of a real run's scoring
step. Checks the memory bound of the engine: peak RSS for 1,000 × 1,000 samples stays below 8 GB.

    python tools/bench_exact.py --nv 1000 --nt 1000 --tokens 45 --json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from forvalue.indexer.evaluate import peak_rss_mb
from forvalue.indexer.features import Features, Head
from forvalue.indexer.score import estimate_flops, exact_scores


def synthetic(n: int, tokens: int, head: Head, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, tokens // 2), tokens * 3 // 2 + 1, (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lens, 0)
    T = int(offsets[-1])
    h = torch.randn(T, head.dim, generator=g)
    y = torch.randint(0, head.vocab_size, (T,), generator=g)
    lse = head.logsumexp(h)
    return Features(h, y, lse, offsets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nv", type=int, default=1000)
    ap.add_argument("--nt", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=45, help="mean scored tokens per sample")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--strategy", default="auto", choices=["auto", "pairs", "gram"])
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print JSON only (the default output is JSON too)")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    # scaled so the softmax is peaked like a trained LM's (a few tokens hold most of the mass)
    head = Head(weight=torch.randn(args.vocab, args.dim, generator=g) * 0.15)
    fv = synthetic(args.nv, args.tokens, head, 1)
    ft = synthetic(args.nt, args.tokens, head, 2)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    S = exact_scores(fv, ft, head, strategy=args.strategy, memory_mb=args.memory_mb)
    seconds = time.perf_counter() - t0
    flops = estimate_flops(fv, ft, args.vocab, args.dim)
    print(json.dumps({
        "nv": args.nv, "nt": args.nt, "scored_tokens": int(fv.h.shape[0] + ft.h.shape[0]),
        "vocab": args.vocab, "dim": args.dim, "strategy": args.strategy,
        "chosen": min(flops, key=flops.get) if args.strategy == "auto" else args.strategy,
        "seconds": round(seconds, 2), "peak_rss_mb_before": round(rss_before), "peak_rss_mb": round(peak_rss_mb()),
        "memory_mb_budget": args.memory_mb, "finite": bool(torch.isfinite(S).all()),
        "gmac_estimate": {k: round(v / 1e9) for k, v in flops.items()},
    }))


if __name__ == "__main__":
    main()
