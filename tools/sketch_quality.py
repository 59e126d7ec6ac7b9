"""How well a first-stage sketch keeps exact For-Value's answers, on a labelled task; prints JSON.

For every valuation row: exact scores over the whole training set, sketch scores, and whether the
exact top-k (most and least influential) lie in the sketch's top-C. With exact re-ranking of C
candidates, fidelity_top10 = overlap of the re-ranked top-10 with the exact top-10.

    python tools/sketch_quality.py ../shared/eval/datainf/grammars --tokens response \
        --configs 16x256,16x512 --features-cache /tmp/fv-cache
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from forvalue.indexer.config import SketchConfig
from forvalue.indexer.data import load_eval_sets
from forvalue.indexer.features import Head
from forvalue.indexer.metrics import candidate_recall_topk, fidelity_at_k
from forvalue.indexer.model import load_model
from forvalue.indexer.sketch import fit_sketcher

from common import cached_exact, cached_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--train", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", default="response")
    ap.add_argument("--configs", default="16x256", help="comma-separated RANKxBUCKETS[:DEDICATED]")
    ap.add_argument("--candidates", default="10,50,100,200")
    ap.add_argument("--features-cache", default=None)
    args = ap.parse_args()

    lm = load_model(args.model)
    head = Head.from_model(lm.model)
    valuation, train = load_eval_sets(args.data, args.train)
    cache = Path(args.features_cache) if args.features_cache else None
    tag = Path(args.data).name
    fv = cached_features(lm, head, valuation, args.tokens, cache, f"{tag}-valuation")
    ft = cached_features(lm, head, train, args.tokens, cache, f"{tag}-train")
    S = cached_exact(fv, ft, head, cache, f"{tag}-{args.tokens}")
    cands = [int(c) for c in args.candidates.split(",")]
    out = []
    for spec in args.configs.split(","):
        shape, _, ded = spec.partition(":")
        rank, buckets = (int(x) for x in shape.split("x"))
        cfg = SketchConfig(rank=rank, buckets=buckets, dedicated=int(ded) if ded else None)
        t0 = time.perf_counter()
        sk = fit_sketcher(ft, head, cfg)
        st, sv = sk.sketch(ft, head), sk.sketch(fv, head)
        approx = sv @ st.T
        row = {"data": tag, "tokens": args.tokens, "rank": rank, "buckets": buckets, "dedicated": cfg.n_dedicated,
               "dim": cfg.dim, "seconds": round(time.perf_counter() - t0, 1)}
        for direction, sign in (("most", 1.0), ("least", -1.0)):
            for c in cands:
                row[f"{direction}_cand_recall10@{c}"] = round(candidate_recall_topk(sign * S, sign * approx, 10, c), 4)
                row[f"{direction}_fidelity10@{c}"] = round(fidelity_at_k(sign * S, sign * approx, 10, c), 4)
        out.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
