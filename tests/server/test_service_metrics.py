"""Server metrics (a real server's /metrics endpoint, scraped over HTTP) and request ids in the access log."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import ConfigError
from forvalue.server.batching import Batcher
from forvalue.server.config import ServerConfig
from forvalue.server.metrics import Metrics
from forvalue.server.protocol import pb, pb_grpc

from serving import ServerThread, corpus

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples_of(response.read().decode())


@pytest.fixture
def metered(served_index, local_index):
    """A fresh server with its metrics endpoint on a free port (fresh counters for every test)."""
    srv = ServerThread(ServerConfig(index_dir=served_index[0], k_cap=20, watch_seconds=0, metrics_port=0),
                       load=lambda: local_index)
    try:
        srv.wait_ready(30)
        yield srv
    finally:
        srv.stop()


def test_counts_codes_durations_and_batches(metered, local_index):
    n_ok, n_bad = 3, 2
    with InfluenceClient(metered.address, timeout=30) as c:
        for i in range(n_ok):
            assert c.search(QUERIES[i:i + 1], k=3).hits
        for _ in range(n_bad):
            with pytest.raises(ServerError) as err:
                c.search(QUERIES[:1], k=0)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    port = metered.server.metrics_port
    assert port is not None and port > 0
    m = scrape(port)
    assert m[("forvalue_requests_total", (("code", "OK"), ("method", "TopK")))] == n_ok
    assert m[("forvalue_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "TopK")))] == n_bad
    assert m[("forvalue_request_seconds_count", (("method", "TopK"),))] == n_ok + n_bad
    assert m[("forvalue_request_seconds_sum", (("method", "TopK"),))] > 0
    assert local_index.version.name == "v000001"
    assert m[("forvalue_index_info", (("version", "v000001"),))] == 1
    passes = metered.server.servicer.stats.forward_passes
    assert passes >= 1  # the bad calls never reach the model; every good one does
    assert m[("forvalue_batch_requests_count", ())] == passes
    assert m[("forvalue_batch_requests_sum", ())] == metered.server.servicer.stats.batched_requests == n_ok
    assert m[("forvalue_queue_depth", ())] == 0
    assert m[("forvalue_dropped_total", (("reason", "expired"),))] == 0
    assert m[("forvalue_dropped_total", (("reason", "cancelled"),))] == 0


def test_request_id_from_metadata_is_returned_and_logged(metered, caplog):
    request = pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in QUERIES[:2]], k=3)
    with grpc.insecure_channel(metered.address) as channel, caplog.at_level(logging.INFO, "forvalue.server.access"):
        response, call = pb_grpc.InfluenceStub(channel).TopK.with_call(
            request, timeout=30, metadata=(("x-request-id", "req-abc-123"),))
    assert response.answers
    assert ("x-request-id", "req-abc-123") in tuple(call.trailing_metadata())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forvalue.server.access"]
    assert len(lines) == 1
    assert lines[0]["request_id"] == "req-abc-123"
    assert (lines[0]["method"], lines[0]["code"], lines[0]["n_samples"], lines[0]["index_version"]) == (
        "TopK", "OK", 2, "v000001")
    assert 0 < lines[0]["seconds"] < 30


def test_request_id_generated_when_absent_also_on_errors(metered, caplog):
    with grpc.insecure_channel(metered.address) as channel, caplog.at_level(logging.INFO, "forvalue.server.access"):
        stub = pb_grpc.InfluenceStub(channel)
        _, call = stub.Info.with_call(pb.InfoRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.TopK(pb.TopKRequest(k=3), timeout=30)  # no samples: INVALID_ARGUMENT
    ids = [dict(call.trailing_metadata()).get("x-request-id"), dict(err.value.trailing_metadata()).get("x-request-id")]
    assert all(i is not None and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "forvalue.server.access"]
    assert [(x["request_id"], x["method"], x["code"]) for x in lines] == [
        (ids[0], "Info", "OK"), (ids[1], "TopK", "INVALID_ARGUMENT")]


def test_metrics_endpoint_off_by_default(influence_server):
    assert influence_server.server.config.metrics_port is None
    assert influence_server.server.metrics_port is None and influence_server.server._metrics_http is None


def test_index_info_names_only_the_served_version():
    metrics = Metrics()
    metrics.serving("v000001")
    metrics.serving("v000002")
    m = samples_of(generate_latest(metrics.registry).decode())
    assert m[("forvalue_index_info", (("version", "v000002"),))] == 1
    assert ("forvalue_index_info", (("version", "v000001"),)) not in m


def test_dropped_row_tokens_and_queue_depth_read_from_the_batcher():
    with ThreadPoolExecutor(1) as executor:
        batcher = Batcher(ServerConfig(index_dir="unused"), executor, lambda: None)
        metrics = Metrics()
        metrics.watch(batcher)
        batcher.stats.add(dropped_expired=2, dropped_cancelled=1, row_tokens_computed=30, row_tokens_reused=7)
        batcher._open = 4  # as if four calls were waiting
        m = samples_of(generate_latest(metrics.registry).decode())
    assert m[("forvalue_dropped_total", (("reason", "expired"),))] == 2
    assert m[("forvalue_dropped_total", (("reason", "cancelled"),))] == 1
    assert m[("forvalue_row_tokens_total", (("source", "computed"),))] == 30
    assert m[("forvalue_row_tokens_total", (("source", "reused"),))] == 7
    assert m[("forvalue_queue_depth", ())] == 4


def test_metrics_port_validated():
    with pytest.raises(ConfigError, match="metrics_port"):
        ServerConfig(index_dir="x", metrics_port=70_000)
