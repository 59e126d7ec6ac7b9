"""SIGTERM under load: `forvalue serve` (a real process) turns health NOT_SERVING, finishes the calls in flight,
refuses new ones UNAVAILABLE, and exits 0 within its grace period."""

from __future__ import annotations

import queue
import signal
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.server.protocol import pb_grpc

from harness import QUERIES, assert_answer, request, wait_for
from serving import expect_line, serve_process

N = 30
SAMPLES = 48  # valuation samples per call: each call is a forward pass of its own (--batch-tokens 1)
GRACE = 30.0


def _watch(stream, q) -> None:
    """Health statuses of a Watch stream into `q`, then how it ended: "OK" or the status code's name."""
    try:
        for reply in stream:
            q.put(reply.status)
        q.put("OK")
    except grpc.RpcError as exc:
        q.put(exc.code().name)


def _samples(i: int) -> list[tuple[str, str]]:
    """The valuation group of call i: one of 5 (so checking the answers takes 5 in-process searches)."""
    return [QUERIES[(i % 5 + j) % len(QUERIES)] for j in range(SAMPLES)]


def test_sigterm_drains_the_calls_in_flight_and_exits_0(served_index, served_model_dir, local_index):
    args = ["--index", served_index[0], "--model", served_model_dir, "--port", "0", "--grace", str(GRACE),
            "--batch-tokens", "1", "--batch-wait-ms", "0", "--watch-seconds", "0"]
    # one torch thread: the tiny model gains nothing from more, and on a busy machine spinning OpenMP
    # threads slow it many times over
    with serve_process(args, env={"OMP_NUM_THREADS": "1"}) as (proc, lines):
        address = expect_line(lines, "listening on").split("listening on ")[1].split(";")[0]
        expect_line(lines, "serving")
        with grpc.insecure_channel(address) as channel:
            stub, health = pb_grpc.InfluenceStub(channel), health_pb2_grpc.HealthStub(channel)
            statuses: queue.Queue = queue.Queue()
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
            threading.Thread(target=_watch, args=(watch, statuses), daemon=True).start()
            assert statuses.get(timeout=30) == health_pb2.HealthCheckResponse.SERVING
            answered = []
            futures = [stub.TopK.future(request(_samples(i)), timeout=120) for i in range(N)]
            for f in futures:
                f.add_done_callback(lambda f: answered.append(f))
            wait_for(lambda: len(answered) >= 1, timeout=60, what="the first answer")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            in_flight = N - len(answered)
            assert statuses.get(timeout=30) == health_pb2.HealthCheckResponse.NOT_SERVING
            # then the server ends the watch: an open one is a call in flight, it would hold the drain
            assert statuses.get(timeout=30) == "OK"

            def refused() -> bool:
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return True
                return False

            wait_for(refused, timeout=10, what="the draining server to refuse new calls")
            try:
                stub.TopK(request(QUERIES[:1]), timeout=10)
                raise AssertionError("a call after SIGTERM was answered")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            responses = [f.result(GRACE) for f in futures]  # every call in flight at SIGTERM: OK
        rc = proc.wait(timeout=GRACE + 30)
        exited = time.monotonic() - signalled
        expect_line(lines, "stopped")
    print(f"{N} calls of {SAMPLES} samples; {in_flight} in flight at SIGTERM, all answered; exit {rc} "
          f"{exited:.2f} s after SIGTERM (grace {GRACE:.0f} s)")
    assert in_flight >= N // 2, f"only {in_flight} calls were in flight at SIGTERM: the test proves little"
    assert rc == 0 and exited < GRACE, (rc, exited)
    expected = [local_index.search(_samples(i), k=5, rerank=12) for i in range(5)]
    for i, response in enumerate(responses):
        (answer,) = response.answers
        assert_answer(answer, response.index_version, expected[i % 5])
