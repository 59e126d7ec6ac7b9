"""Indexing throughput against a bare forward pass of the same model, in one run; prints one JSON object.

bare    model(input_ids, attention_mask) over the same length-bucketed batches (logits included), no
        sketching, no writing;
index   the build's per-shard work: forward pass, one fused pass over the vocabulary per batch
        (log-partition, sketch, top probabilities, ‖G‖), re-rank data, shard writes (fsync'd, on the
        build's background writer), FAISS; the sketch-map fit (a one-off pass over a sample) is timed
        separately.

The two alternate (bare, index, bare, index, ...) and the best of each is kept, which cancels most of
this shared machine's noise. Target: ratio = index samples/s ÷ bare samples/s ≥ 0.85 on CPU, ≥ 0.90 on GPU.
Real architectures need no weights: `--model random:qwen2.5-0.5b` (also random:qwen2.5-1.5b,
random:llama-3.2-1b; indexer/archs.py) times the same as the trained model.

    python tools/bench_index.py --json [--model DIR|FILE.gguf|random:ARCH] [--rows 256] [--tokens all]
                                [--device cuda] [--dtype auto|float32|bfloat16|float16] [--batch-tokens auto|N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from forvalue.indexer.build import encode_shard, fit_maps
from forvalue.indexer.config import DTYPE_CHOICES, BuildConfig, SketchConfig
from forvalue.indexer.data import Sample
from forvalue.indexer.examples import make_transform_dataset
from forvalue.indexer.features import ForwardConfig, Head, plan_batches
from forvalue.indexer.forward import batch_sizes, encode
from forvalue.indexer.model import load_model
from forvalue.indexer.store import IndexRoot


def corpus(rows: int) -> list[Sample]:
    per = max(1, rows // 10) + 1
    data = make_transform_dataset(n_classes=10, n_train_per_class=min(per, 25), n_test_per_class=5, seed=0)
    data = (data * (rows // len(data) + 1))[:rows]
    return [Sample(id=str(i), prompt=r["prompt"], response=r["response"]) for i, r in enumerate(data)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_forward(lm, samples, config) -> float:
    fwd = ForwardConfig.of_build(config)
    enc = [encode(lm.tokenizer, s.prompt, s.response, fwd) for s in samples]
    device = lm.device
    _sync(device)
    t0 = time.perf_counter()
    for b in plan_batches([len(e.ids) for e in enc], fwd.batch_tokens, fwd.max_batch):
        L = max(len(enc[i].ids) for i in b)
        ids = torch.zeros(len(b), L, dtype=torch.long)
        mask = torch.zeros(len(b), L, dtype=torch.long)
        for j, i in enumerate(b):
            ids[j, : len(enc[i].ids)] = torch.tensor(enc[i].ids)
            mask[j, : len(enc[i].ids)] = 1
        lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - t0


def index_pass(lm, head, sk, samples, config, out_dir) -> float:
    from forvalue.indexer.ann import SketchIndex
    from forvalue.indexer.build import BackgroundWriter

    root = IndexRoot(out_dir)
    build = root.open_build("bench" + str(time.monotonic_ns()))
    writer = BackgroundWriter(build)
    _sync(lm.device)
    t0 = time.perf_counter()
    index = None
    try:
        for j in range(0, len(samples), config.shard_size):
            arrays, tokens, offsets, rows = encode_shard(lm, head, sk, samples[j : j + config.shard_size], config)
            writer.submit(j // config.shard_size, arrays, rows, tokens, offsets)
            if index is None:
                index = SketchIndex(arrays["sketch"].shape[1])
            index.add(arrays["sketch"])
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    build.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", default="all", choices=["all", "response"])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-tokens", default="4096", help="padded tokens per batch, or auto (sized to the device)")
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    head = Head.from_model(lm.model).to(lm.device)
    samples = corpus(args.rows)
    batch_tokens, max_batch = batch_sizes(args.batch_tokens, lm.model, 2048)
    config = BuildConfig(tokens=args.tokens, sketch=SketchConfig(rank=args.rank, buckets=args.dim // args.rank,
                                                                 fit_samples=min(args.rows, 256)),
                         shard_size=args.shard_size, batch_tokens=batch_tokens, max_batch=max_batch)
    t0 = time.perf_counter()
    sk, _ = fit_maps(lm, head, samples, config)
    fit_s = time.perf_counter() - t0
    bare, idx = [], []
    with tempfile.TemporaryDirectory() as tmp:
        bare_forward(lm, samples[:16], config)  # warm-up
        for _ in range(args.repeats):
            bare.append(bare_forward(lm, samples, config))
            idx.append(index_pass(lm, head, sk, samples, config, tmp))
    n_tokens = sum(len(encode(lm.tokenizer, s.prompt, s.response, ForwardConfig.of_build(config)).ids) for s in samples)
    b, i = min(bare), min(idx)
    device = lm.device.type if lm.device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(lm.device)})"
    print(json.dumps({
        "device": device, "dtype": lm.dtype_name, "model": lm.name,
        "parameters": sum(p.numel() for p in lm.model.parameters()), "load_seconds": round(load_s, 2),
        "rows": len(samples), "tokens": args.tokens, "input_tokens": n_tokens,
        "sketch_dim": config.sketch.dim, "batch_tokens": batch_tokens, "max_batch": max_batch,
        "threads": torch.get_num_threads(),
        "bare_seconds": round(b, 2), "index_seconds": round(i, 2), "fit_seconds": round(fit_s, 2),
        "bare_samples_per_s": round(len(samples) / b, 2), "index_samples_per_s": round(len(samples) / i, 2),
        "bare_tokens_per_s": round(n_tokens / b, 1), "index_tokens_per_s": round(n_tokens / i, 1),
        "ratio": round(b / i, 3), "all_bare_seconds": [round(x, 2) for x in bare],
        "all_index_seconds": [round(x, 2) for x in idx],
    }))


if __name__ == "__main__":
    main()
