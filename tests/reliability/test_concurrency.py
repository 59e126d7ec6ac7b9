"""Many concurrent calls: every one is answered OK or RESOURCE_EXHAUSTED (retryable, counted), never
CANCELLED; health keeps answering during the storm.

grpc's C core cancels calls that wait unmatched beyond its pending-request limits (about 1,000 soft) before
the servicer sees them: the client got CANCELLED (its own doing, as it reads it) with no request id and no
metric. The server raises those limits; the batcher's bounded queue (max_queue) is what refuses work.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.server.protocol import pb_grpc

from harness import QUERIES, request, start

CALLS = 2000


async def storm(address: str, n: int) -> tuple[collections.Counter, list[str]]:
    """n TopK calls at once on one channel, and health checks while they run → (codes, health answers)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InfluenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        await stub.TopK(request([QUERIES[0]]), timeout=60)  # connected and warm
        calls = [stub.TopK(request([QUERIES[i % len(QUERIES)]]), timeout=120) for i in range(n)]
        checks = []
        for _ in range(3):
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            checks.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        results = await asyncio.gather(*calls, return_exceptions=True)
    codes = collections.Counter("OK" if not isinstance(r, Exception) else r.code().name for r in results)
    return codes, checks


def test_a_storm_of_calls_is_answered_ok_or_resource_exhausted(served_index, local_index):
    srv = start(served_index[0], lambda: local_index, max_queue=256)
    try:
        codes, checks = asyncio.run(storm(srv.address, CALLS))
        counted = srv.server.servicer.metrics.requests
    finally:
        srv.stop()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert sum(codes.values()) == CALLS and codes["OK"] > 0
    assert checks == ["SERVING"] * 3
    # every call of the storm is counted in the metrics with its code (+1: the warm-up call)
    assert counted.labels(method="TopK", code="OK")._value.get() == codes["OK"] + 1
    assert counted.labels(method="TopK", code="RESOURCE_EXHAUSTED")._value.get() == codes["RESOURCE_EXHAUSTED"]
