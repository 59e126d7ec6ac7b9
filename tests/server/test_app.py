"""The server application (server/app.py): health and reflection, NOT_SERVING until the index is loaded or
when it cannot be, a port in use, draining on stop."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import ConfigError, IndexMismatchError
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc

from serving import ServerThread, block_model, corpus, pb_samples, queued, server_config, wait_for

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]


def test_health_and_reflection(client, influence_server):
    assert client.health() == "SERVING" and client.health(SERVICE_NAME) == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(influence_server.address) as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def test_health_not_serving_until_loaded(served_index, local_index):
    release = threading.Event()

    def slow_load():
        assert release.wait(60), "the test never released the load"
        return local_index

    srv = ServerThread(server_config(served_index, reflection=False), load=slow_load)
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

    srv = ServerThread(server_config(served_index), load=mismatched)
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


def test_port_in_use_is_a_config_error(influence_server, served_index):
    from forvalue.server.app import create_server

    async def second():
        return create_server(server_config(served_index), influence_server.address)

    with pytest.raises(ConfigError, match="cannot listen"):
        influence_server.run(second())


def test_stop_drains_in_flight_calls(served_index, local_index):
    srv = ServerThread(server_config(served_index), load=lambda: local_index)
    stopped = None
    try:
        srv.wait_ready(30)
        gate = block_model(srv)
        with InfluenceClient(srv.address, timeout=60) as c:
            in_flight = pb_grpc.InfluenceStub(c._channel).TopK.future(
                pb.TopKRequest(samples=pb_samples(QUERIES[0]), k=3))
            wait_for(queued(srv, 1), what="the call to reach the model's queue")
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


def test_start_and_every_swap_are_told(tmp_path, served_index, served_lm, caplog):
    """Once loaded the server says what it serves (index, version, rows, model, address), and every swap old →
    new; `announce` (what `forvalue serve` prints) gets the same lines instead of the log."""
    import shutil

    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig, SketchConfig
    from forvalue.indexer.index import Index
    from forvalue.indexer.store import IndexRoot

    root = str(tmp_path / "index")
    shutil.copytree(served_index[0], root)
    index_root = IndexRoot(root)
    v1 = index_root.current()
    cfg = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=5), shard_size=16)
    v2 = build_index(root, corpus(5, seed=3, prefix="t"), served_lm, cfg)
    index_root.set_current(v1)
    caplog.set_level(logging.INFO, logger="forvalue.server")
    srv = ServerThread(server_config((root,), watch_seconds=0), load=lambda: Index.open(root, served_lm))
    try:
        srv.wait_ready()
        told = [r.getMessage() for r in caplog.records if r.name == "forvalue.server"]
        start = [m for m in told if m.startswith("serving ")]
        assert start == [f"serving {root} version {v1} (36 rows, model {served_lm.name}) on {srv.address}"], told
        heard = []
        srv.server.announce = heard.append
        index_root.set_current(v2)
        assert srv.run(srv.server.reload()) == v2
        assert heard == [f"index swap: {v1} → {v2}: now serving {root} version {v2} (5 rows, model "
                         f"{served_lm.name})"]
    finally:
        srv.stop()
