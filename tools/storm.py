"""N concurrent TopK calls against a `forvalue serve` process: every call must end OK or RESOURCE_EXHAUSTED
(never CANCELLED), and health must answer during the storm.

    python tools/storm.py --calls 10000 --json [--model M] [--index DIR] [--serve-arg=--max-queue=1024]

Without --index, an index of the example data's training rows is built with --model first (tools/common.py).
Prints one JSON object: the codes counted, seconds, health answers during the storm.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import example_rows, open_or_build_index, start_server


async def storm(address: str, queries: list, n: int, timeout: float) -> dict:
    from forvalue.server.protocol import pb, pb_grpc

    def request(i: int) -> pb.TopKRequest:
        p, r = queries[i % len(queries)]
        return pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r)], k=10)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InfluenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        await stub.TopK(request(0), timeout=120)
        t0 = time.perf_counter()
        calls = [stub.TopK(request(i), timeout=timeout) for i in range(n)]
        checks = []
        for _ in range(5):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            checks.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        results = await asyncio.gather(*calls, return_exceptions=True)
        seconds = time.perf_counter() - t0
    codes = collections.Counter("OK" if not isinstance(r, Exception) else r.code().name for r in results)
    return {"calls": n, "codes": dict(codes), "cancelled": codes.get("CANCELLED", 0), "seconds": round(seconds, 1),
            "health_during": checks, "ok_or_resource_exhausted": set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--index", default=None)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=600.0, help="deadline of every call, seconds")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `forvalue serve` argument (repeat)")
    ap.add_argument("--json", action="store_true", help="JSON only (the output is JSON anyway)")
    args = ap.parse_args()
    from forvalue.indexer.model import load_model

    tmp = tempfile.TemporaryDirectory()
    train, queries = example_rows()
    index_dir = args.index
    if index_dir is None:
        index_dir, _ = open_or_build_index(load_model(args.model), None, train, f"{tmp.name}/index")
    proc, address = start_server(index_dir, args.model, args.serve_arg)
    try:
        out = asyncio.run(storm(address, queries, args.calls, args.timeout))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps({"model": args.model or "SmolLM2-135M-Instruct", "serve_args": args.serve_arg, **out}))


if __name__ == "__main__":
    main()
