"""Indexing throughput against a bare forward pass of the same model, in one run; prints one JSON object.

bare    model(input_ids, attention_mask) over the same length-bucketed batches (logits included), no
        sketching, no writing;
index   the build's per-shard work: forward pass, log-partition + sketch, re-rank data, shard writes
        (fsync'd), FAISS; the sketch-map fit (a one-off pass over a sample) is timed separately.

The two alternate (bare, index, bare, index, ...) and the best of each is kept, which cancels most of
this shared machine's noise. Target: ratio = index samples/s ÷ bare samples/s ≥ 0.85 on CPU.

    python tools/bench_index.py --json [--model DIR|FILE.gguf] [--rows 256] [--tokens all]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from forvalue.indexer.build import BuildConfig, encode_shard, fit_maps
from forvalue.indexer.data import Sample
from forvalue.indexer.examples import make_transform_dataset
from forvalue.indexer.forward import Head, encode, plan_batches
from forvalue.indexer.model import load_model
from forvalue.indexer.sketch import SketchConfig
from forvalue.indexer.store import IndexRoot


def corpus(rows: int) -> list[Sample]:
    per = max(1, rows // 10) + 1
    data = make_transform_dataset(n_classes=10, n_train_per_class=min(per, 25), n_test_per_class=5, seed=0)
    data = (data * (rows // len(data) + 1))[:rows]
    return [Sample(id=str(i), prompt=r["prompt"], response=r["response"]) for i, r in enumerate(data)]


@torch.inference_mode()
def bare_forward(lm, samples, config) -> float:
    fwd = config.forward()
    enc = [encode(lm.tokenizer, s.prompt, s.response, fwd) for s in samples]
    t0 = time.perf_counter()
    for b in plan_batches([len(e.ids) for e in enc], fwd.batch_tokens, fwd.max_batch):
        L = max(len(enc[i].ids) for i in b)
        ids = torch.zeros(len(b), L, dtype=torch.long)
        mask = torch.zeros(len(b), L, dtype=torch.long)
        for j, i in enumerate(b):
            ids[j, : len(enc[i].ids)] = torch.tensor(enc[i].ids)
            mask[j, : len(enc[i].ids)] = 1
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - t0


def index_pass(lm, head, sk, samples, config, out_dir) -> float:
    from forvalue.indexer.ann import SketchIndex

    root = IndexRoot(out_dir)
    build = root.open_build("bench" + str(time.monotonic_ns()))
    t0 = time.perf_counter()
    index = None
    for j in range(0, len(samples), config.shard_size):
        arrays, tokens, offsets, rows = encode_shard(lm, head, sk, samples[j : j + config.shard_size], config)
        build.write_shard(j // config.shard_size, arrays, rows, token_arrays=tokens, offsets=offsets)
        if index is None:
            index = SketchIndex(arrays["sketch"].shape[1])
        index.add(arrays["sketch"])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", default="all", choices=["all", "response"])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    head = Head.from_model(lm.model)
    samples = corpus(args.rows)
    config = BuildConfig(tokens=args.tokens, sketch=SketchConfig(rank=args.rank, buckets=args.dim // args.rank,
                                                                 fit_samples=min(args.rows, 256)),
                         shard_size=128, batch_tokens=args.batch_tokens)
    t0 = time.perf_counter()
    sk, _ = fit_maps(lm, head, samples, config)
    fit_s = time.perf_counter() - t0
    bare, idx = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bare_forward(lm, samples[:16], config)  # warm-up
        for _ in range(args.repeats):
            bare.append(bare_forward(lm, samples, config))
            idx.append(index_pass(lm, head, sk, samples, config, tmp))
    n_tokens = sum(len(encode(lm.tokenizer, s.prompt, s.response, config.forward()).ids) for s in samples)
    b, i = min(bare), min(idx)
    print(json.dumps({
        "device": "cpu", "model": lm.name, "rows": len(samples), "tokens": args.tokens, "input_tokens": n_tokens,
        "sketch_dim": config.sketch.dim, "batch_tokens": args.batch_tokens, "threads": torch.get_num_threads(),
        "bare_seconds": round(b, 2), "index_seconds": round(i, 2), "fit_seconds": round(fit_s, 2),
        "bare_samples_per_s": round(len(samples) / b, 2), "index_samples_per_s": round(len(samples) / i, 2),
        "bare_tokens_per_s": round(n_tokens / b, 1), "index_tokens_per_s": round(n_tokens / i, 1),
        "ratio": round(b / i, 3), "all_bare_seconds": [round(x, 2) for x in bare],
        "all_index_seconds": [round(x, 2) for x in idx],
    }))


if __name__ == "__main__":
    main()
