"""Overload: with the queue full and the model held, new calls are refused RESOURCE_EXHAUSTED at once (none
hangs), health still answers, and every admitted call completes OK once the model is released."""

from __future__ import annotations

import statistics
import time

import grpc

from forvalue.server.protocol import pb_grpc

from harness import QUERIES, HeldIndex, assert_answer, health, reference, request, start, wait_for

MAX_QUEUE = 4
REJECTIONS = 20
BOUND = 0.05  # seconds: a refusal is answered at once, it never waits for the model


def test_a_full_queue_refuses_at_once_and_the_admitted_complete(served_index, local_index):
    held = HeldIndex(local_index)
    srv = start(served_index[0], lambda: held, max_queue=MAX_QUEUE, batch_wait_ms=0, watch_seconds=0)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            stub.TopK(request([QUERIES[0]]), timeout=30)  # warm: channel connected, grpc's handlers built
            held.hold()
            held.entered.clear()
            admitted = [stub.TopK.future(request([QUERIES[i]]), timeout=60) for i in range(MAX_QUEUE)]
            wait_for(lambda: srv.server.servicer.batcher.queued == MAX_QUEUE, what="the queue to fill")
            wait_for(held.entered.is_set, what="the first admitted batch to reach the held model")
            seconds, codes = [], []
            for i in range(REJECTIONS):
                t0 = time.monotonic()
                try:
                    stub.TopK(request([QUERIES[5 + i]]), timeout=2)  # a hang would end DEADLINE_EXCEEDED
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                seconds.append(time.monotonic() - t0)
            # health is not work for the model: it answers while the queue is full
            assert health(channel) == "SERVING"
            held.release()
            responses = [f.result(60) for f in admitted]
    finally:
        held.release()
        srv.stop()
    summary = (f"{REJECTIONS} calls over a full queue of {MAX_QUEUE}: median {statistics.median(seconds) * 1000:.1f} "
               f"ms, max {max(seconds) * 1000:.1f} ms; codes {sorted({c.name for c in codes})}")
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * REJECTIONS, summary
    assert statistics.median(seconds) < BOUND, summary
    assert max(seconds) < 2.0, summary  # every call returned on its own, before its deadline
    for i, response in enumerate(responses):
        (answer,) = response.answers
        assert_answer(answer, response.index_version, reference(local_index, i))
    print(summary)
