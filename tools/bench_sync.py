"""What a periodic rebuild costs with `index sync` against a fresh build, in one run; prints one JSON object.

A corpus of --rows rows (the example generator's sentence transformations, each made unique) is indexed; then
--changed of it changes (a third of that share of rows edited, a third removed, a third added) and the index is
synced to it (`sync.sync_index`: only new and edited rows are encoded). The same changed corpus is then built
fresh with the same sketch maps (`build_index(..., maps=...)`, the reference the sync must equal; without a
fit of new maps, so the fresh build is timed at its cheapest). Target: sync seconds / fresh seconds <= 0.15, and
both versions answer every query (most and least, top-k) with the same ids and the same scores.

    python tools/bench_sync.py --json [--model DIR|random:ARCH|tiny] [--rows 2000] [--changed 0.05] [--queries 8]

--model tiny is the tests' model (tests/factories.py: a random 2-layer Llama, d = 32, |V| = 128, a character
tokenizer): seconds instead of minutes, but its forward pass is so cheap that the sync's fixed costs (reading
and verifying the base, copying the reused rows, the recall) weigh more than with a real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import numpy as np
import torch

from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig
from forvalue.indexer.data import Sample
from forvalue.indexer.examples import make_transform_dataset
from forvalue.indexer.index import Index
from forvalue.indexer.model import load_model
from forvalue.indexer.sketch import MAP_FILES, Sketcher
from forvalue.indexer.store import IndexRoot
from forvalue.indexer.sync import sync_index


def corpus(rows: int, prefix: str = "r", offset: int = 0) -> list[Sample]:
    """`rows` distinct samples: the example's transformations, each prompt numbered."""
    data = make_transform_dataset(n_classes=10, n_train_per_class=25, n_test_per_class=5, seed=0)
    return [Sample(id=f"{prefix}{i}", prompt=f"{r['prompt']} (item {i + offset})", response=r["response"])
            for i, r in ((i, data[(i + offset) % len(data)]) for i in range(rows))]


def changed_corpus(old: list[Sample], share: float, seed: int = 0) -> tuple[list[Sample], dict]:
    """`old` with round(share · n) rows changed: a third edited (response), a third removed, a third added."""
    n_changed = round(share * len(old))
    n_edit, n_remove = n_changed // 3, n_changed // 3
    n_add = n_changed - n_edit - n_remove
    pick = np.random.default_rng(seed).permutation(len(old))
    edit, remove = set(pick[:n_edit].tolist()), set(pick[n_edit : n_edit + n_remove].tolist())
    new = [dataclasses.replace(s, response=s.response + " indeed") if i in edit else s
           for i, s in enumerate(old) if i not in remove]
    added = corpus(n_add, prefix="new", offset=len(old))
    half = len(new) // 2
    return new[:half] + added[: n_add // 2] + new[half:] + added[n_add // 2 :], {
        "edited": n_edit, "removed": n_remove, "added": n_add}


def compare_answers(a: Index, b: Index, queries: list[Sample], k: int, rerank: int) -> dict:
    """Whether both indexes give every query the same top-k (ids, most and least) and the largest score gap."""
    same, gap = True, 0.0
    for q in queries:
        f = a.encode([q])
        for direction in ("most", "least"):
            ra = a.search([q], k=k, direction=direction, rerank=rerank, features=f, calibrate=False)
            rb = b.search([q], k=k, direction=direction, rerank=rerank, features=f, calibrate=False)
            same &= [h.id for h in ra.hits] == [h.id for h in rb.hits]
            gap = max(gap, max(abs(x.score - y.score) for x, y in zip(ra.hits, rb.hits)))
    return {"identical_ids": bool(same), "max_score_diff": float(gap), "queries": len(queries), "k": k,
            "rerank": rerank}


def tiny_model():
    """The tests' tiny model and tokenizer (tests/factories.py) as a LoadedModel named "tiny"."""
    import sys
    from pathlib import Path

    from forvalue.indexer.model import LoadedModel, model_fingerprint, tokenizer_fingerprint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from factories import make_model, make_tokenizer

    model, tok = make_model(seed=0), make_tokenizer()
    return LoadedModel(model, tok, "tiny", model_fingerprint(model), tokenizer_fingerprint(tok))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF directory, .gguf, random:ARCH or tiny [default: SmolLM2-135M]")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--changed", type=float, default=0.05)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = tiny_model() if args.model == "tiny" else load_model(args.model)
    cfg = BuildConfig()
    old = corpus(args.rows)
    new, changes = changed_corpus(old, args.changed)
    with tempfile.TemporaryDirectory() as tmp:
        root, ref = f"{tmp}/synced", f"{tmp}/fresh"
        t0 = time.perf_counter()
        build_index(root, old, lm, cfg)
        t1 = time.perf_counter()
        result = sync_index(root, new, lm, batch_tokens=cfg.batch_tokens)
        t2 = time.perf_counter()
        with IndexRoot(root).load("v000001") as v:
            maps = Sketcher.from_arrays({n: np.array(v.global_array(n)) for n in MAP_FILES}, cfg.sketch.buckets)
        t3 = time.perf_counter()
        build_index(ref, new, lm, cfg, maps=maps)
        t4 = time.perf_counter()
        queries = corpus(args.queries, prefix="q", offset=7 * args.rows + 3)
        answers = compare_answers(Index.open(root, lm), Index.open(ref, lm), queries, args.k, args.rerank)
    sync_s, fresh_s = t2 - t1, t4 - t3
    out = {"model": lm.name, "device": "cpu", "threads": torch.get_num_threads(), "rows": args.rows,
           "rows_after": len(new), "changed_share": args.changed, "changes": changes,
           "first_build_seconds": round(t1 - t0, 2), "sync_seconds": round(sync_s, 2),
           "fresh_build_seconds": round(fresh_s, 2), "ratio": round(sync_s / fresh_s, 4), "target": 0.15,
           "sync": result.as_dict(), "answers": answers}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
