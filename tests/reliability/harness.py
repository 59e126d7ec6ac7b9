"""Helpers of the reliability tests: requests, the in-process reference, a model that can be held or counted."""

from __future__ import annotations

import threading

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.server import convert
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import pb, pb_grpc

from serving import ServerThread, block_model, corpus, wait_for  # noqa: F401 (re-exported)

QUERIES = [(s.prompt, s.response) for s in corpus(25, seed=11, prefix="q")]
K, RERANK = 5, 12  # rerank below the 36 rows: the FAISS first stage chooses the candidates


def request(samples, k=K, direction=pb.MOST, rerank=RERANK) -> pb.TopKRequest:
    """A grouped TopK request for (prompt, response) pairs."""
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in samples], k=k,
                          direction=direction, rerank=rerank, group=True)


def reference(index, q: int, direction: str = "most"):
    """The in-process answer to `request([QUERIES[q]])` on `index` (one version)."""
    return index.search([QUERIES[q]], k=K, direction=direction, rerank=RERANK)


def assert_answer(answer: pb.Answer, version: str, local) -> None:
    """A remote answer equals an in-process SearchResult: ids, ranks, rows, version; scores to rtol 1e-5."""
    remote = convert.search_result(answer, version)
    ids = ([h.id for h in remote.hits], [h.id for h in local.hits])
    assert ids[0] == ids[1], f"version {version}: ids {ids[0]} served, {ids[1]} in-process"
    assert [(h.rank, h.row) for h in remote.hits] == [(h.rank, h.row) for h in local.hits], f"version {version}"
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], rtol=1e-5, atol=1e-6)
    meta = [(r.version, r.direction, r.candidates) for r in (remote, local)]
    assert meta[0] == meta[1], f"(version, direction, candidates) {meta[0]} served, {meta[1]} in-process"


def health(channel: grpc.Channel, timeout: float = 10) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def assert_healthy(channel: grpc.Channel, local_index) -> None:
    """Health says SERVING and a normal query is answered as in-process."""
    assert health(channel) == "SERVING"
    response = pb_grpc.InfluenceStub(channel).TopK(request([QUERIES[0]]), timeout=30)
    (answer,) = response.answers
    assert_answer(answer, response.index_version, reference(local_index, 0))


def start(index_dir: str, load, **config) -> ServerThread:
    """A ready in-process server (k_cap 20) on its own loop; `load` returns the index to serve."""
    srv = ServerThread(ServerConfig(index_dir=index_dir, **{"k_cap": 20, **config}), load=load)
    srv.wait_ready(30)
    return srv


class HeldIndex:
    """The real index behind a gate: every `encode` (the forward pass) is counted, and waits while held.

    Attributes:
        encoded: samples per encode call, in call order.
        entered: set once an encode call is waiting at the gate (or passed it).
    """

    def __init__(self, index, held: bool = False):
        self._index = index
        self._gate = threading.Event()
        if not held:
            self._gate.set()
        self.entered = threading.Event()
        self.encoded: list[int] = []
        self.samples: list[tuple[str, str]] = []  # every sample that reached the forward pass
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._index, name)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def encode(self, samples):
        with self._lock:
            self.encoded.append(len(samples))
            self.samples.extend(samples)
        self.entered.set()
        if not self._gate.wait(60):
            raise TimeoutError("the test never released the model")
        return self._index.encode(samples)
