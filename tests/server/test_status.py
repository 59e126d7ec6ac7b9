"""One place maps exceptions to status codes (server/status.py): a malformed message and bad input are
INVALID_ARGUMENT, an index of another model FAILED_PRECONDITION, a full queue RESOURCE_EXHAUSTED, anything
unexpected a logged INTERNAL that leaks no internals."""

from __future__ import annotations

import logging

import grpc
import pytest

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.errors import (ConfigError, DataError, DeadlineExceededError, IndexChangedError, IndexCorruptError,
                                     IndexMismatchError, InvalidRequestError, ModelError, NotReadyError,
                                     ResourceExhaustedError, ShardsUnavailableError, UnknownIdsError)
from forvalue.server.status import status_of
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc

from serving import ServerThread, block_model, corpus, pb_samples, queued, server_config, wait_for

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]


CODES = [
    (NotReadyError("loading"), "UNAVAILABLE"),
    (ShardsUnavailableError("shard 2 down"), "UNAVAILABLE"),
    (ResourceExhaustedError("queue full"), "RESOURCE_EXHAUSTED"),
    (DeadlineExceededError("expired"), "DEADLINE_EXCEEDED"),
    (IndexMismatchError("other model"), "FAILED_PRECONDITION"),
    (IndexCorruptError("bad checksum"), "FAILED_PRECONDITION"),
    (ModelError("text-only"), "FAILED_PRECONDITION"),
    (UnknownIdsError("no row"), "NOT_FOUND"),
    (IndexChangedError("CURRENT moved"), "ABORTED"),
    (DataError("bad row"), "INVALID_ARGUMENT"),
    (ConfigError("bad k"), "INVALID_ARGUMENT"),
    (InvalidRequestError("k", "must be >= 1"), "INVALID_ARGUMENT"),
    (ValueError("not ours"), "INTERNAL"),
    (RuntimeError("CUDA error"), "INTERNAL"),
]


@pytest.mark.parametrize("exc,code", CODES, ids=[type(e).__name__ for e, _ in CODES])
def test_status_of_maps_each_error_class(exc, code):
    """The table of the module docstring, most specific class first (an UnknownIdsError is a DataError)."""
    assert status_of(exc) == getattr(grpc.StatusCode, code)


def test_malformed_message_is_invalid_argument(client):
    raw = client._channel.unary_unary(f"/{SERVICE_NAME}/TopK")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\xff\xff\xff", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("request: ")
    assert client.health() == "SERVING"


def test_index_of_another_model_is_failed_precondition(served_index, tokenizer, tmp_path):
    from factories import make_model

    other = tmp_path / "other-model"
    make_model(seed=1).save_pretrained(other)  # same architecture and tokenizer, other weights
    tokenizer.save_pretrained(other)
    srv = ServerThread(server_config(served_index, model_path=str(other)))  # the real loader
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
    srv = ServerThread(server_config(served_index), load=lambda: _BrokenIndex(local_index))
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


def test_full_queue_is_resource_exhausted(served_index, local_index):
    srv = ServerThread(server_config(served_index, max_queue=1), load=lambda: local_index)
    try:
        srv.wait_ready(30)
        gate = block_model(srv)
        with InfluenceClient(srv.address, timeout=60) as c:
            stub = pb_grpc.InfluenceStub(c._channel)
            request = pb.TopKRequest(samples=pb_samples(QUERIES[0]), k=3)
            first = stub.TopK.future(request)
            wait_for(queued(srv, 1), what="the first call to reach the model's queue")
            with pytest.raises(grpc.RpcError) as err:
                stub.TopK(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert len(first.result(timeout=60).answers[0].hits) == 3
    finally:
        srv.stop()
