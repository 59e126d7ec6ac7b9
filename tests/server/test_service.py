"""The influence service on localhost (port 0) through the real client: answers equal the in-process Index."""

from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import ConfigError, ForValueError, IndexMismatchError
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc

from serving import ServerThread, block_model, corpus, wait_for

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]
RERANK = 12  # below the 36 rows: the FAISS first stage chooses the candidates


@pytest.fixture(scope="module")
def client(influence_server):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        yield c


def assert_same(remote, local):
    assert [h.id for h in remote.hits] == [h.id for h in local.hits]
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], rtol=1e-5, atol=1e-5)
    assert [h.rank for h in remote.hits] == [h.rank for h in local.hits]
    assert [h.row for h in remote.hits] == [h.row for h in local.hits]
    assert [h.metadata for h in remote.hits] == [h.metadata for h in local.hits]
    assert (remote.version, remote.direction, remote.candidates) == (local.version, local.direction, local.candidates)


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("n_queries", [1, 3])
def test_topk_equals_in_process_search(client, local_index, direction, n_queries):
    q = QUERIES[:n_queries]
    assert_same(client.search(q, k=5, direction=direction, rerank=RERANK),
                local_index.search(q, k=5, direction=direction, rerank=RERANK))


def test_both_directions_and_per_sample_answers(client, local_index):
    answers = client.top_k(QUERIES, k=4, direction="both", rerank=RERANK, group=False)
    assert [(i, r.direction) for i, r in answers] == [(i, d) for i in range(3) for d in ("most", "least")]
    for i, result in answers:
        assert_same(result, local_index.search([QUERIES[i]], k=4, direction=result.direction, rerank=RERANK))
    group = client.top_k(QUERIES, k=4, direction="both", rerank=RERANK, group=True)
    assert [(i, r.direction) for i, r in group] == [(-1, "most"), (-1, "least")]
    for _, result in group:
        assert_same(result, local_index.search(QUERIES, k=4, direction=result.direction, rerank=RERANK))


def test_k_above_rerank_is_raised_to_k_as_in_process(client, local_index):
    assert_same(client.search(QUERIES[:1], k=8, rerank=3), local_index.search(QUERIES[:1], k=8, rerank=3))


def test_texts_truncated_on_request(client):
    (_, res), = client.top_k(QUERIES[:1], k=5, max_text_chars=6)
    assert all(len(h.metadata["prompt"]) <= 6 and len(h.metadata["response"]) <= 6 for h in res.hits)


def test_score_all_chunks_equal_group_mean(client, local_index, served_index):
    ids, scores = client.score_all(QUERIES, chunk_size=7)  # 36 rows: 6 chunks, the last one short
    assert ids == [s.id for s in served_index[1]]
    ref = local_index.score_matrix(local_index.encode(QUERIES)).mean(0).numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    chunks = list(pb_grpc.InfluenceStub(client._channel).ScoreAll(
        pb.ScoreAllRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in QUERIES], chunk_size=7)))
    assert [c.offset for c in chunks] == [0, 7, 14, 21, 28, 35]
    assert {c.index_version for c in chunks} == {local_index.version.name}


def test_info(client, local_index):
    info = client.info()
    m = local_index.manifest
    assert info["index_version"] == local_index.version.name
    assert (info["model_name"], info["model_fingerprint"]) == (m["model"]["name"], m["model"]["fingerprint"])
    assert (info["tokens"], info["n_samples"], info["sketch_dim"], info["index_kind"]) == (
        "response", 36, 4 * 32, "flat-ip")
    assert "files" not in info["manifest"] and info["manifest"]["sketch"] == m["sketch"]


def test_health_and_reflection(client, influence_server):
    assert client.health() == "SERVING" and client.health(SERVICE_NAME) == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(influence_server.address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def _samples(*pairs):
    return [pb.ValuationSample(prompt=p, response=r) for p, r in pairs]


BAD = [
    ("TopK", pb.TopKRequest(k=3), "samples"),
    ("TopK", pb.TopKRequest(samples=_samples(("p", "  ")), k=3), "samples[0].response"),
    ("TopK", pb.TopKRequest(samples=_samples(("p", " r")), k=0), "k"),
    ("TopK", pb.TopKRequest(samples=_samples(("p", " r")), k=21), "k"),  # the fixture's k_cap is 20
    ("TopK", pb.TopKRequest(samples=_samples(("p", " r")), k=3, direction=9), "direction"),
    ("TopK", pb.TopKRequest(samples=_samples(("p", " r")), k=3, rerank=-5), "rerank"),
    ("TopK", pb.TopKRequest(samples=[pb.ValuationSample(response=" r", image=b"\x89PNG", image_mime_type="image/png")],
                            k=3), "samples[0].image"),
    ("ScoreAll", pb.ScoreAllRequest(samples=_samples(("p", ""))), "samples[0].response"),
    ("ScoreAll", pb.ScoreAllRequest(samples=_samples(("p", " r")), chunk_size=-2), "chunk_size"),
]


@pytest.mark.parametrize("method,request_,field", BAD, ids=[f"{m}-{f}" for m, _, f in BAD])
def test_bad_request_is_invalid_argument_naming_the_field(influence_server, client, method, request_, field):
    stub = pb_grpc.InfluenceStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        call = getattr(stub, method)(request_, timeout=30)
        list(call) if method == "ScoreAll" else call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ": ")
    assert client.health() == "SERVING"
    assert client.search(QUERIES[:1], k=1).hits  # still answering


def test_malformed_message_is_invalid_argument(client):
    raw = client._channel.unary_unary(f"/{SERVICE_NAME}/TopK")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request: ")
    assert client.health() == "SERVING"


def test_client_errors_are_forvalue_errors(client):
    with pytest.raises(ServerError) as err:
        client.search(QUERIES[:1], k=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k: must be between 1 and 20" in str(err.value)
    assert isinstance(err.value, ForValueError)
    with pytest.raises(ConfigError):
        client.search(QUERIES[:1], direction="both")  # search mirrors Index.search: most or least
    with InfluenceClient("127.0.0.1:1", timeout=5) as nobody:
        with pytest.raises(ServerError) as err:
            nobody.info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# --- servers of their own: loading, failures, limits, draining ---------------------------------------


def _config(served_index, **kw):
    return ServerConfig(index_dir=served_index[0], **kw)


def test_health_not_serving_until_loaded(served_index, local_index):
    release = threading.Event()

    def slow_load():
        assert release.wait(60), "the test never released the load"
        return local_index

    srv = ServerThread(_config(served_index, reflection=False), load=slow_load)
    try:
        with InfluenceClient(srv.address, timeout=30) as c:
            assert c.health() == "NOT_SERVING" and c.health(SERVICE_NAME) == "NOT_SERVING"
            with pytest.raises(ServerError) as err:
                c.info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details
            watch = health_pb2_grpc.HealthStub(c._channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            release.set()
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert c.info()["n_samples"] == 36
    finally:
        release.set()
        srv.stop()


def test_load_failure_keeps_not_serving(served_index):
    def mismatched():
        raise IndexMismatchError("index built with another model; pass --model")

    srv = ServerThread(_config(served_index), load=mismatched)
    try:
        with pytest.raises(IndexMismatchError):
            srv.wait_ready(30)
        with InfluenceClient(srv.address, timeout=30) as c:
            assert c.health() == "NOT_SERVING"
            for call in (lambda: c.search(QUERIES[:1]), c.info, lambda: c.score_all(QUERIES[:1])):
                with pytest.raises(ServerError) as err:
                    call()
                # permanent until an operator acts: not the retryable UNAVAILABLE of a server still loading
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert "could not load its index" in err.value.details and "another model" in err.value.details
    finally:
        srv.stop()


def test_index_of_another_model_is_failed_precondition(served_index, tokenizer, tmp_path):
    from factories import make_model

    other = tmp_path / "other-model"
    make_model(seed=1).save_pretrained(other)  # same architecture and tokenizer, other weights
    tokenizer.save_pretrained(other)
    srv = ServerThread(_config(served_index, model_path=str(other)))  # the real loader
    try:
        with pytest.raises(IndexMismatchError):
            srv.wait_ready(60)
        with InfluenceClient(srv.address, timeout=30) as c:
            with pytest.raises(ServerError) as err:
                c.search(QUERIES[:1])
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--model" in err.value.details
            assert c.health() == "NOT_SERVING"
    finally:
        srv.stop()


class _BrokenIndex:
    """The real index, except that its forward pass fails unexpectedly."""

    def __init__(self, index):
        self._index = index

    def __getattr__(self, name):
        return getattr(self._index, name)

    def encode(self, samples):
        raise RuntimeError("CUDA error: something the user did not cause")


def test_unexpected_error_is_logged_internal(served_index, local_index, caplog):
    srv = ServerThread(_config(served_index), load=lambda: _BrokenIndex(local_index))
    try:
        srv.wait_ready(30)
        with InfluenceClient(srv.address, timeout=30) as c, caplog.at_level(logging.ERROR, "forvalue.server"):
            with pytest.raises(ServerError) as err:
                c.search(QUERIES[:1])
            assert err.value.code == grpc.StatusCode.INTERNAL
            assert "RuntimeError" in err.value.details and "CUDA" not in err.value.details  # no internals leak
            assert any("TopK failed unexpectedly" in r.message and r.exc_info for r in caplog.records)
            assert c.health() == "SERVING" and c.info()["n_samples"] == 36
    finally:
        srv.stop()


def test_port_in_use_is_a_config_error(influence_server, served_index):
    from forvalue.server.app import create_server

    async def second():
        return create_server(_config(served_index), influence_server.address)

    with pytest.raises(ConfigError, match="cannot listen"):
        influence_server.run(second())


def _queued(srv, n):
    return lambda: srv.server._executor._work_queue.qsize() >= n


def test_full_queue_is_resource_exhausted(served_index, local_index):
    srv = ServerThread(_config(served_index, max_queue=1), load=lambda: local_index)
    try:
        srv.wait_ready(30)
        gate = block_model(srv)
        with InfluenceClient(srv.address, timeout=60) as c:
            stub = pb_grpc.InfluenceStub(c._channel)
            request = pb.TopKRequest(samples=_samples(QUERIES[0]), k=3)
            first = stub.TopK.future(request)
            wait_for(_queued(srv, 1), what="the first call to reach the model's queue")
            with pytest.raises(grpc.RpcError) as err:
                stub.TopK(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert len(first.result(timeout=60).answers[0].hits) == 3
    finally:
        srv.stop()


def test_stop_drains_in_flight_calls(served_index, local_index):
    srv = ServerThread(_config(served_index), load=lambda: local_index)
    stopped = None
    try:
        srv.wait_ready(30)
        gate = block_model(srv)
        with InfluenceClient(srv.address, timeout=60) as c:
            in_flight = pb_grpc.InfluenceStub(c._channel).TopK.future(
                pb.TopKRequest(samples=_samples(QUERIES[0]), k=3))
            wait_for(_queued(srv, 1), what="the call to reach the model's queue")
            import asyncio

            # the grace outlasts every bounded wait below (a probe on a draining server can hang until its
            # own timeout), so the in-flight call can only end by finishing, never by the grace running out
            stopped = asyncio.run_coroutine_threadsafe(srv.server.stop(300), srv.loop)

            def refused():
                with InfluenceClient(srv.address, timeout=2) as probe:
                    try:
                        probe.health()
                    except ServerError:
                        return True
                return False

            wait_for(refused, timeout=60, what="the draining server to refuse new calls")
            gate.set()
            assert len(in_flight.result(timeout=60).answers[0].hits) == 3  # finished, not cancelled
            stopped.result(60)
    finally:
        srv.stop()
