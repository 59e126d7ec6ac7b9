"""Expired and cancelled calls never reach the forward pass: 50 whose deadline passes while they wait, 20 the
client cancels, 30 normal ones mixed in; the drops are counted, the normal calls answered."""

from __future__ import annotations

import grpc

from forvalue.server.protocol import pb, pb_grpc

from harness import HeldIndex, QUERIES, assert_answer, block_model, request, start, wait_for

KINDS = ["expire"] * 5 + ["cancel"] * 2 + ["normal"] * 3  # the pattern of every 10 calls: 50, 20, 30 of 100
SCORE_ALL = {10, 40, 70}  # these expiring calls are ScoreAll (un-batched, through the same queue)
EXPIRE = 3.0  # seconds: long enough for all 100 calls to be queued first, even on a busy machine


def _sample(i: int) -> tuple[str, str]:
    prompt, response = QUERIES[i % len(QUERIES)]
    return f"{prompt} #{i}", response  # each call's sample is its own: what reached the model is known


def test_expired_and_cancelled_never_reach_the_model(served_index, local_index):
    counting = HeldIndex(local_index)  # never held: it counts what reaches the forward pass
    # calls 0-9 form one batch queued behind the blocked model (a long batch wait lets all ten join), so
    # its expired and cancelled calls are dropped in the model's thread; calls 10-99 wait in the batcher
    # and are dropped on the event loop
    srv = start(served_index[0], lambda: counting, batch_wait_ms=300, watch_seconds=0)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            stub.TopK(request([QUERIES[0]]), timeout=30)  # warm-up: one forward pass
            gate = block_model(srv)
            calls = {"expire": [], "cancel": [], "normal": []}
            batcher, stats = srv.server.servicer.batcher, srv.server.servicer.stats
            for i in range(100):
                if i == 10:
                    wait_for(lambda: batcher.queued == 10 and srv.server._executor._work_queue.qsize() == 1,
                             what="calls 0-9 to wait in the model's executor as one batch")
                kind = KINDS[i % 10]
                if i in SCORE_ALL:
                    future = stub.ScoreAll(pb.ScoreAllRequest(samples=request([_sample(i)]).samples), timeout=EXPIRE)
                else:
                    future = stub.TopK.future(request([_sample(i)]), timeout=EXPIRE if kind == "expire" else 60)
                calls[kind].append((i, future))
            wait_for(lambda: batcher.queued == 100, what=f"100 calls to be queued (queued {batcher.queued})")
            for _, future in calls["cancel"]:
                assert future.cancel()
            for i, future in calls["expire"]:
                try:
                    list(future) if i in SCORE_ALL else future.result(30)
                    raise AssertionError(f"expiring call {i} was answered")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (i, exc)
            # the server's deadline comes a little after the client's: release the model only once the
            # server saw every expiring and cancelled call end
            wait_for(lambda: batcher.queued == 30, what=f"70 calls to end on the server (queued {batcher.queued})")
            gate.set()
            normal = [(i, future.result(60)) for i, future in calls["normal"]]
            wait_for(lambda: (stats.dropped_expired, stats.dropped_cancelled) == (50, 20),
                     what=f"50 + 20 drops: {stats.snapshot()}")
            snapshot = stats.snapshot()
    finally:
        srv.stop()
    reached = set(counting.samples[1:])  # after the warm-up
    expected = {_sample(i) for i, _ in calls["normal"]}
    assert reached == expected, (f"{len(reached - expected)} expired or cancelled samples reached the model; "
                                 f"{len(expected - reached)} normal ones did not")
    # the warm-up; the 3 live calls of the first batch; the 27 normal calls that waited in the batcher
    assert counting.encoded == [1, 3, 27], counting.encoded
    assert snapshot["batched_requests"] == 31 and snapshot["forward_passes"] == len(counting.encoded), snapshot
    assert (snapshot["dropped_expired"], snapshot["dropped_cancelled"]) == (50, 20), snapshot
    for i, response in normal:
        (answer,) = response.answers
        assert_answer(answer, response.index_version, local_index.search([_sample(i)], k=5, rerank=12))
    print(f"100 calls: 50 expired, 20 cancelled dropped before the model; 30 answered in "
          f"{len(counting.encoded) - 1} forward passes; stats {snapshot}")
