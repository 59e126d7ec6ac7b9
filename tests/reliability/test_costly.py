"""Costly requests: one request must not stall the server. Requests above the documented limits are refused
before any work (naming the limit); a request within them is stopped at its deadline during the work, not
after; a reply above the message limit is refused before it is computed, and counted as refused."""

from __future__ import annotations

import time

import grpc
import pytest

from forvalue.server.protocol import pb, pb_grpc

from harness import QUERIES, request, start


def costly(samples, k, explain_pairs, group=False) -> pb.TopKRequest:
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in samples], k=k,
                          direction=pb.BOTH, group=group, explain=explain_pairs > 0, explain_pairs=explain_pairs)


def call(stub, req, timeout):
    t0 = time.monotonic()
    try:
        stub.TopK(req, timeout=timeout)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    return code, details, time.monotonic() - t0


@pytest.fixture
def served(served_index, local_index):
    srv = start(served_index[0], lambda: local_index, watch_seconds=0, k_cap=1000, max_explain_pairs=100)
    try:
        yield srv
    finally:
        srv.stop()


def test_the_costly_request_is_refused_at_once_naming_the_limit(served):
    """256 samples, k = 1000, both directions, 100 explained pairs: 512,000 hits asked for."""
    many = [QUERIES[i % len(QUERIES)] for i in range(256)]
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.InfluenceStub(channel)
        stub.TopK(request([QUERIES[0]]), timeout=30)  # warm
        passes = served.server.servicer.stats.forward_passes
        code, details, seconds = call(stub, costly(many, 1000, 100), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_answer_hits" in details, (code, details)
    assert seconds < 1.0  # refused before any work (about a millisecond; the bound allows a loaded machine)
    assert served.server.servicer.stats.forward_passes == passes


def test_too_many_explained_hits_are_refused(served):
    with grpc.insecure_channel(served.address) as channel:
        code, details, _ = call(pb_grpc.InfluenceStub(channel), costly(QUERIES, 36, 100), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_explained_hits" in details, (code, details)


def test_work_within_the_limits_stops_at_the_deadline(served_index, local_index):
    """25 samples × 2 directions × 36 explained hits (about 14 s of work on the tiny model) with a 1 s
    deadline: the model is free again soon after the deadline, not when the work would have ended."""
    srv = start(served_index[0], lambda: local_index, watch_seconds=0, k_cap=1000, max_explain_pairs=100,
                max_explained_hits=10_000, batch_wait_ms=0)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            stub.TopK(request([QUERIES[0]]), timeout=30)  # warm
            code, _, seconds = call(stub, costly(QUERIES, 36, 100), timeout=1.0)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            t0 = time.monotonic()
            stub.TopK(request([QUERIES[1]]), timeout=60)  # waits for the model: as long as the costly work runs
            freed = time.monotonic() - t0
    finally:
        srv.stop()
    assert freed < 5.0, f"the model was busy {freed:.1f} s after the costly call's 1 s deadline"


def test_a_reply_above_the_message_limit_is_refused_before_any_work(served_index, local_index):
    srv = start(served_index[0], lambda: local_index, watch_seconds=0, k_cap=1000, max_message_bytes=16_384)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            stub.TopK(request([QUERIES[0]]), timeout=30)  # warm: a small reply still passes
            passes = srv.server.servicer.stats.forward_passes
            code, details, _ = call(stub, costly(QUERIES, 36, 0), timeout=30)  # 50 answers × 36 rows
            counted = srv.server.servicer.metrics.requests.labels(method="TopK", code="RESOURCE_EXHAUSTED")
            assert counted._value.get() == 1
    finally:
        srv.stop()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in details, (code, details)
    assert srv.server.servicer.stats.forward_passes == passes
