"""Shared by the tools/ scripts (tested in tests/tools/test_common.py): features and exact scores cached on disk
between runs (torch files), the index a benchmark queries, the example rows a service benchmark serves, and a
`forvalue serve` process to measure."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from forvalue.indexer.features import Features, ForwardConfig
from forvalue.indexer.forward import extract_features
from forvalue.indexer.score import exact_scores


def cached_features(lm, head, samples, tokens: str, cache: Path | None, name: str) -> Features:
    """Features of `samples`, read from `cache/<name>-<tokens>.pt` when present, else computed and saved."""
    path = cache / f"{name}-{tokens}.pt" if cache else None
    if path is not None and path.exists():
        d = torch.load(path)
        return Features(d["h"], d["y"], d["lse"], d["offsets"])
    f = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples],
                         ForwardConfig(tokens=tokens), head, progress=True, desc=name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"h": f.h, "y": f.y, "lse": f.lse, "offsets": f.offsets}, path)
    return f


def open_or_build_index(lm, index_dir: str | None, train, build_dir: str):
    """(its directory, the opened Index): `index_dir` as given, or when None a default-config index of `train`
    built into `build_dir`."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig
    from forvalue.indexer.index import Index

    if index_dir is None:
        index_dir = build_dir
        build_index(index_dir, train, lm, BuildConfig())
    return index_dir, Index.open(index_dir, lm)


def cached_exact(fv: Features, ft: Features, head, cache: Path | None, name: str) -> torch.Tensor:
    """Exact full-vocabulary scores, cached like the features."""
    path = cache / f"{name}-exact.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path)
    S = exact_scores(fv, ft, head)
    if path is not None:
        torch.save(S, path)
    return S


def example_samples(seed: int = 0) -> tuple[list, list]:
    """(training Samples, valuation Samples) of the example data set: 10 sentence transformations, 24 training
    and 6 valuation rows each, labelled by transformation."""
    from forvalue.indexer.data import Sample
    from forvalue.indexer.examples import make_transform_dataset

    rows = make_transform_dataset(n_classes=10, n_train_per_class=24, n_test_per_class=6, seed=seed)

    def samples(split: str, prefix: str) -> list:
        return [Sample(id=f"{prefix}{i}", prompt=r["prompt"], response=r["response"], label=r.get("label"))
                for i, r in enumerate(r for r in rows if r["split"] == split)]

    return samples("train", "t"), samples("test", "v")


def example_rows(seed: int = 0) -> tuple[list, list]:
    """(training Samples, valuation (prompt, response) pairs) of the example data set (`example_samples`)."""
    train, test = example_samples(seed)
    return train, [(s.prompt, s.response) for s in test]


def benchmark_parser(description: str, queries: int = 30) -> argparse.ArgumentParser:
    """The options every index benchmark takes: --model, --index, --valuation, --k, --rerank, --queries, --json."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=None, help="HF directory or .gguf [default: SmolLM2-135M-Instruct]")
    ap.add_argument("--index", default=None, help="an index built with --model [default: built here on the "
                                                  "example data]")
    ap.add_argument("--valuation", default=None, help="valuation rows (JSONL/Parquet) [default: the example's]")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--queries", type=int, default=queries)
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    return ap


def open_benchmark(args: argparse.Namespace, build_dir: str):
    """(the model, the index directory, the opened Index, the valuation Samples) of a benchmark's options:
    --index or an index of the example's training rows built into `build_dir`; --valuation or the example's
    valuation rows."""
    from forvalue.indexer.data import load_valuation_set
    from forvalue.indexer.model import load_model

    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    train, queries = example_samples()
    index_dir, idx = open_or_build_index(lm, args.index, train, build_dir)
    if args.valuation is not None:
        queries = load_valuation_set(args.valuation)
    return lm, index_dir, idx, queries


def batched_forward_qps(model, ids: list, batch: int, device, repeats: int = 2) -> float:
    """Queries per second of bare forward passes over the queries `ids` ((1, T) each), `batch` at a time,
    longest first (the least padding), right-padded with an attention mask, logits of the last position
    only: the compute limit of this machine for these queries (a server must do at least this)."""
    pad = 0
    seqs = sorted((t[0] for t in ids), key=len, reverse=True)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for a in range(0, len(seqs), batch):
            part = seqs[a : a + batch]
            n = max(len(s) for s in part)
            x = torch.full((len(part), n), pad, dtype=torch.long, device=device)
            mask = torch.zeros((len(part), n), dtype=torch.long, device=device)
            for i, s in enumerate(part):
                x[i, : len(s)] = s
                mask[i, : len(s)] = 1
            model(input_ids=x, attention_mask=mask, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return len(seqs) / best


def forward_limit_qps(model, ids: list, max_batch: int, device, repeats: int = 2) -> tuple[float, int]:
    """(queries per second, batch size) of the fastest bare batched forward passes over the queries `ids`
    (`batched_forward_qps`) at batch sizes 4, 8, 16, ... up to `max_batch`, and `max_batch` itself: the
    machine's compute limit for these queries, whatever batch size it is reached at."""
    sizes = sorted({b for b in (2 ** e for e in range(2, 12)) if b < max_batch} | {max(1, max_batch)})
    return max((batched_forward_qps(model, ids, b, device, repeats), b) for b in sizes)


def start_server(index_dir: str, model: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`forvalue serve --port 0` in its own process → (process, address) once health says SERVING."""
    cmd = [sys.executable, "-m", "forvalue.client.cli", "serve", "--index", index_dir, "--port", "0", *extra]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    address = None
    for line in proc.stderr:
        m = re.search(r"listening on (\S+):(\d+)", line)
        if m:
            address = f"{m.group(1)}:{m.group(2)}"
        if line.startswith("forvalue: serving"):
            break
        if proc.poll() is not None:
            break
    if address is None or proc.poll() is not None:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
    return proc, address
