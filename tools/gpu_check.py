"""Helpers of tools/gpu_check.sh: the first stage at scale on the GPU, and the one JSON summary.

    python tools/gpu_check.py firststage --rows 1000000 --dim 4096 [--device cuda] --json
    python tools/gpu_check.py summary DIR        # DIR: the step logs and status files gpu_check.sh wrote
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def firststage(rows: int, dim: int, queries: int, k: int, device: str, chunk: int) -> dict:
    """Exact inner-product top-k (most and least) over `rows` random sketches of `dim` dims held on `device`,
    by torch matrix products in row chunks; checked against a float64 reference on a subset of the rows."""
    import torch

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, dim, generator=g, device=dev, dtype=torch.float32)
    q = torch.randn(queries, dim, generator=g, device=dev, dtype=torch.float32)

    def topk(qs: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        best_s = best_i = None
        for a in range(0, rows, chunk):
            s = qs @ x[a : a + chunk].T
            v, i = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest)
            i = i + a
            if best_s is None:
                best_s, best_i = v, i
            else:
                v2, j = torch.topk(torch.cat([best_s, v], 1), k, dim=1, largest=largest)
                best_s, best_i = v2, torch.gather(torch.cat([best_i, i], 1), 1, j)
        return best_s, best_i

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    topk(q[:1], True)  # warm
    one = [timed(lambda i=i: topk(q[i : i + 1], d == "most")) for i in range(min(queries, 20)) for d in ("most", "least")]
    batch = timed(lambda: (topk(q, True), topk(q, False)))
    # the reference: float64 brute force on the first min(rows, 100k) rows, both directions, a few queries
    m = min(rows, 100_000)
    ref = (q[:4].double() @ x[:m].double().T)
    sub = x[:m]
    agree = []
    for largest in (True, False):
        want = torch.topk(ref, k, dim=1, largest=largest).indices.sort(1).values
        s = q[:4] @ sub.T
        got = torch.topk(s, k, dim=1, largest=largest).indices.sort(1).values
        agree.append(float((want == got).float().mean()))
    return {"rows": rows, "dim": dim, "device": str(dev), "k": k, "bytes": rows * dim * 4,
            "p50_ms_one_query_one_direction": round(statistics.median(one) * 1000, 2),
            "ms_per_query_both_directions_batched": round(batch / queries * 1000, 3), "queries": queries,
            "reference_agreement": min(agree), "first_stage": "exact (torch matmul + topk on the device)"}


def summary(folder: Path) -> dict:
    """{step: {rc, seconds, result (the step's last JSON line, if any)}} of gpu_check.sh's status.txt and logs."""
    out = {}
    lines = (folder / "status.txt").read_text().splitlines() if (folder / "status.txt").exists() else []
    for line in lines:
        name, rc, seconds = line.split()
        log = folder / f"{name}.log"
        result = None
        if log.exists():
            for line in reversed(log.read_text(errors="replace").splitlines()):
                line = line.strip()
                if line.startswith("{") and line.endswith("}"):
                    try:
                        result = json.loads(line)
                        break
                    except json.JSONDecodeError:
                        continue
            if result is None and name == "gpu_tests":
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if " passed" in ln or
                        " failed" in ln or " skipped" in ln or "no tests ran" in ln]
                result = {"pytest": tail[-1] if tail else None}
        out[name] = {"rc": int(rc), "seconds": float(seconds), "result": result}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fs = sub.add_parser("firststage")
    fs.add_argument("--rows", type=int, default=1_000_000)
    fs.add_argument("--dim", type=int, default=4096)
    fs.add_argument("--queries", type=int, default=64)
    fs.add_argument("--k", type=int, default=100)
    fs.add_argument("--chunk", type=int, default=262_144)
    fs.add_argument("--device", default="cuda")
    fs.add_argument("--json", action="store_true")
    sm = sub.add_parser("summary")
    sm.add_argument("folder")
    args = ap.parse_args()
    if args.cmd == "firststage":
        print(json.dumps(firststage(args.rows, args.dim, args.queries, args.k, args.device, args.chunk)))
    else:
        print(json.dumps(summary(Path(args.folder)), sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
