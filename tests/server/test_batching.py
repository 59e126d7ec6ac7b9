"""Dynamic batching, deadlines and hot swap of the influence server, on localhost (port 0) through real calls."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from forvalue.indexer.errors import ConfigError, DeadlineExceededError, ResourceExhaustedError
from forvalue.server import convert
from forvalue.server.batching import Batcher, top_k
from forvalue.server.convert import estimate_tokens
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import pb, pb_grpc
from forvalue.server.status import status_of

from serving import ServerThread, block_model, corpus, wait_for

QUERIES = [(s.prompt, s.response) for s in corpus(25, seed=11, prefix="q")]
K, RERANK = 5, 12  # rerank below the 36 rows: the FAISS first stage chooses the candidates


def request(samples, k=K, direction=pb.MOST, group=True):
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt=p, response=r) for p, r in samples], k=k,
                          direction=direction, rerank=RERANK, group=group)


def assert_answer(answer: pb.Answer, version: str, local):
    """A remote answer equals an in-process SearchResult: ids, ranks, rows, version; scores to rtol 1e-5."""
    remote = convert.search_result(answer, version)
    assert [h.id for h in remote.hits] == [h.id for h in local.hits]
    assert [(h.rank, h.row) for h in remote.hits] == [(h.rank, h.row) for h in local.hits]
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], rtol=1e-5, atol=1e-6)
    assert (remote.version, remote.direction, remote.candidates) == (local.version, local.direction, local.candidates)


def assert_response(response: pb.TopKResponse, req: pb.TopKRequest, index):
    """A TopK response equals the unbatched in-process reference `top_k` on `index` (its version included)."""
    query = convert.topk_query(req, ServerConfig(index_dir="unused"))
    expected = top_k(index, query)
    assert response.index_version == index.version.name
    assert [(a.query_index, convert.search_result(a, "").direction) for a in response.answers] == [
        (q, r.direction) for q, r in expected]
    for answer, (_, local) in zip(response.answers, expected):
        assert_answer(answer, response.index_version, local)


async def send_all(address: str, requests, timeout: float = 120):
    """Send every request at once on one asyncio channel; responses (or the RpcError) in request order."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InfluenceStub(channel)
        return await asyncio.gather(*(stub.TopK(r, timeout=timeout) for r in requests), return_exceptions=True)


class CountingIndex:
    """The real index; counts the samples of every forward pass, and fails those holding `fail_on`."""

    def __init__(self, index, fail_on: str | None = None):
        self._index = index
        self._fail_on = fail_on
        self.encoded: list[int] = []  # samples per encode call

    def __getattr__(self, name):
        return getattr(self._index, name)

    def encode(self, samples):
        self.encoded.append(len(samples))
        if self._fail_on is not None and any(self._fail_on in r for _, r in samples):
            raise ConfigError(f"cannot encode a response holding {self._fail_on!r}")
        return self._index.encode(samples)


def _server(served_index, load, **kw):
    srv = ServerThread(ServerConfig(index_dir=served_index[0], k_cap=20, **kw), load=load)
    srv.wait_ready(30)
    return srv


# --- batching ------------------------------------------------------------------------------------------


def test_500_concurrent_queries_share_forward_passes(served_index, local_index):
    srv = _server(served_index, lambda: local_index)
    try:
        requests = [request([QUERIES[i % 25]]) for i in range(500)]
        responses = asyncio.run(send_all(srv.address, requests))
        errors = [r for r in responses if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        expected = {i: local_index.search([QUERIES[i]], k=K, direction="most", rerank=RERANK) for i in range(25)}
        for i, response in enumerate(responses):
            assert response.index_version == local_index.version.name
            (answer,) = response.answers
            assert_answer(answer, response.index_version, expected[i % 25])
        stats = srv.server.servicer.stats.snapshot()
        assert stats["batched_requests"] == 500 and stats["dropped_expired"] == stats["dropped_cancelled"] == 0
        assert stats["forward_passes"] < 500 and stats["max_batch_seen"] > 1, stats
        # requests of one pass repeat queries: their exact scores share the rows' distributions
        assert stats["row_tokens_computed"] > 0 and stats["row_tokens_reused"] > 0, stats
        assert srv.server.servicer.batcher.queued == 0
    finally:
        srv.stop()


# 1-3 samples per request, grouped or one answer each, one or both directions: the features of every
# request are cut out of the shared pass at its own offsets
MIXED = [request(QUERIES[i : i + 1 + i % 3], direction=(pb.BOTH, pb.MOST, pb.LEAST)[i % 3], group=i % 2 == 0)
         for i in range(25)]


def test_batched_answers_equal_unbatched(served_index, local_index):
    answers = {}
    for name, kw in (("unbatched", dict(max_batch_requests=1, batch_wait_ms=0)),
                     ("batched", dict(batch_wait_ms=50))):
        srv = _server(served_index, lambda: local_index, **kw)
        try:
            answers[name] = asyncio.run(send_all(srv.address, MIXED))
            stats = srv.server.servicer.stats
            assert stats.batched_requests == len(MIXED)
            if name == "unbatched":
                assert stats.max_batch_seen == 1 and stats.forward_passes == len(MIXED)
            else:
                assert stats.max_batch_seen > 1 and stats.forward_passes < len(MIXED)
        finally:
            srv.stop()
    for req, unbatched, batched in zip(MIXED, answers["unbatched"], answers["batched"]):
        assert_response(unbatched, req, local_index)
        assert_response(batched, req, local_index)


def test_a_failing_shared_pass_answers_each_job_alone(served_index, local_index):
    counting = CountingIndex(local_index, fail_on="BOOM")
    srv = _server(served_index, lambda: counting, batch_wait_ms=0)
    try:
        gate = block_model(srv)
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            first = stub.TopK.future(request([QUERIES[0]]), timeout=60)
            wait_for(lambda: srv.server._executor._work_queue.qsize() >= 1, what="the first batch to be queued")
            rest = [request([QUERIES[i]]) for i in (1, 2, 3, 4)] + [request([("Upper: x ->", " BOOM")])]
            futures = [stub.TopK.future(r, timeout=60) for r in rest]
            wait_for(lambda: srv.server.servicer.batcher.queued == 6, what="all calls to be queued")
            gate.set()
            assert_response(first.result(60), request([QUERIES[0]]), local_index)
            for r, f in zip(rest[:4], futures[:4]):
                assert_response(f.result(60), r, local_index)
            with pytest.raises(grpc.RpcError) as err:
                futures[4].result(60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "BOOM" in err.value.details()
        # the first alone, the shared pass of the other five (failed), then each of the five again
        assert counting.encoded == [1, 5, 1, 1, 1, 1, 1]
        stats = srv.server.servicer.stats
        assert (stats.forward_passes, stats.max_batch_seen, stats.batched_requests) == (7, 5, 6)
    finally:
        srv.stop()


# --- deadlines, cancellation, a full queue ----------------------------------------------------------------


def test_expired_and_cancelled_calls_never_reach_the_model(served_index, local_index):
    counting = CountingIndex(local_index)
    srv = _server(served_index, lambda: counting)
    try:
        gate = block_model(srv)
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            expiring = [stub.TopK.future(request([QUERIES[i]]), timeout=1.0) for i in range(5)]
            scores = stub.ScoreAll(pb.ScoreAllRequest(samples=request([QUERIES[5]]).samples), timeout=1.0)
            cancelled = stub.TopK.future(request([QUERIES[6]]), timeout=60)
            wait_for(lambda: srv.server.servicer.batcher.queued == 7, what="all calls to be queued")
            cancelled.cancel()
            for f in expiring:
                with pytest.raises(grpc.RpcError) as err:
                    f.result(30)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError) as err:
                list(scores)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the server's deadline comes a little after the client's: release the model only once the
            # server saw every call end, so the test does not race a deadline a few ms away
            wait_for(lambda: srv.server.servicer.batcher.queued == 0, what="the server to see the calls end")
            gate.set()
            stats = srv.server.servicer.stats
            wait_for(lambda: (stats.dropped_expired, stats.dropped_cancelled) == (6, 1), what=f"7 drops: {stats}")
            assert counting.encoded == [] and stats.forward_passes == 0 and stats.batched_requests == 0
            assert_response(stub.TopK(request([QUERIES[7]]), timeout=60), request([QUERIES[7]]), local_index)
            assert counting.encoded == [1] and stats.forward_passes == 1
    finally:
        srv.stop()


def _query(samples):
    return convert.topk_query(request(samples), ServerConfig(index_dir="unused"))


def test_a_deadline_passed_on_arrival_never_reaches_the_model(local_index):
    counting = CountingIndex(local_index)

    async def main():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(ServerConfig(index_dir="unused"), executor, lambda: counting)
            with pytest.raises(DeadlineExceededError):
                await batcher.top_k(_query([QUERIES[0]]), deadline=time.monotonic() - 0.001)
            version, answers = await batcher.top_k(_query([QUERIES[0]]), deadline=time.monotonic() + 60)
            await batcher.close()
            return batcher.stats, version, answers

    stats, version, answers = asyncio.run(main())
    assert (stats.dropped_expired, stats.forward_passes, counting.encoded) == (1, 1, [1])
    assert version == local_index.version.name and len(answers) == 1
    assert status_of(DeadlineExceededError("x")) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_full_queue_is_resource_exhausted_at_once(local_index):
    gate = threading.Event()

    async def main():
        with ThreadPoolExecutor(1) as executor:
            executor.submit(gate.wait, 60)
            batcher = Batcher(ServerConfig(index_dir="unused", max_queue=2), executor, lambda: local_index)
            waiting = [asyncio.ensure_future(batcher.top_k(_query([QUERIES[i]]))) for i in range(2)]
            await asyncio.sleep(0.05)
            assert batcher.queued == 2
            t0 = time.monotonic()
            with pytest.raises(ResourceExhaustedError, match="queue is full"):
                await batcher.top_k(_query([QUERIES[2]]))
            assert time.monotonic() - t0 < 1.0
            gate.set()
            done = await asyncio.gather(*waiting)
            await batcher.close()
            return done

    try:
        done = asyncio.run(main())
    finally:
        gate.set()
    assert [v for v, _ in done] == [local_index.version.name] * 2
    assert status_of(ResourceExhaustedError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_estimate_and_config_validation():
    assert estimate_tokens([("abcd", "efgh"), ("", " x")]) == (2 + 1) + (1 + 1)
    for bad in (dict(batch_wait_ms=-1), dict(batch_tokens=0), dict(max_batch_requests=0), dict(watch_seconds=-0.5),
                dict(watch_seconds=float("nan"))):
        with pytest.raises(ConfigError):
            ServerConfig(index_dir="x", **bad)


def test_cli_serve_options_reach_the_config(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import forvalue.server.app as app
    from forvalue.client.cli import main

    seen = {}
    monkeypatch.setattr(app, "serve", lambda config, address, announce=print: seen.update(config=config))
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path), "--port", "0", "--batch-wait-ms", "2.5",
                                  "--batch-tokens", "1000", "--max-batch-requests", "3", "--watch-seconds", "0"],
                            env={"FORVALUE_TOKEN": None})
    assert r.exit_code == 0, r.output
    config = seen["config"]
    assert (config.batch_wait_ms, config.batch_tokens, config.max_batch_requests, config.watch_seconds) == \
        (2.5, 1000, 3, 0.0)


# --- hot swap -----------------------------------------------------------------------------------------------


def _build_config(n):
    from forvalue.indexer.config import BuildConfig, SketchConfig

    return BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=n), shard_size=16)


class Load:
    """Clients sending TopK queries from threads until stopped; records (query, sent at, response or error)."""

    def __init__(self, address: str, threads: int = 3):
        self.results: list[tuple[int, float, object]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(address, t), daemon=True) for t in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, address: str, seed: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            i = seed
            while not self._stop.is_set():
                q = i % len(QUERIES)
                sent = time.monotonic()
                try:
                    out = stub.TopK(request([QUERIES[q]]), timeout=60)
                except grpc.RpcError as exc:
                    out = exc
                with self._lock:
                    self.results.append((q, sent, out))
                i += 7

    def count(self, predicate=lambda r: True) -> int:
        with self._lock:
            return sum(1 for r in self.results if predicate(r))

    def stop(self) -> list[tuple[int, float, object]]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return list(self.results)


def test_new_version_is_served_under_load_without_failing_or_mixing(tmp_path, served_index, served_model_dir,
                                                                    served_lm):
    from forvalue.indexer.build import build_index
    from forvalue.indexer.index import Index

    root = str(tmp_path / "index")
    shutil.copytree(served_index[0], root)  # the session's index stays as it is
    srv = _server((root,), None, model_path=served_model_dir, watch_seconds=0.05)  # the default loader
    load = None
    try:
        v1 = srv.server.servicer.version
        load = Load(srv.address)
        wait_for(lambda: load.count() >= 20, what="answers from the first version")
        v2 = build_index(root, corpus(30, seed=3, prefix="t"), served_lm, _build_config(30))  # moves CURRENT
        assert v2 != v1
        wait_for(lambda: srv.server.servicer.version == v2, what="the watcher to serve the new version")
        swapped = time.monotonic()
        wait_for(lambda: load.count(lambda r: r[1] > swapped) >= 20, what="answers after the swap")
        results = load.stop()
    finally:
        if load is not None:
            load.stop()
        srv.stop()
    errors = [out for _, _, out in results if isinstance(out, grpc.RpcError)]
    assert not errors, errors[:3]
    assert {out.index_version for _, _, out in results} == {v1, v2}
    indexes = {v: Index.open(root, served_lm, version=v) for v in (v1, v2)}
    expected = {}
    for q, sent, out in results:
        key = (out.index_version, q)
        if key not in expected:
            expected[key] = indexes[key[0]].search([QUERIES[q]], k=K, direction="most", rerank=RERANK)
        (answer,) = out.answers
        assert_answer(answer, out.index_version, expected[key])
        if sent > swapped:
            assert out.index_version == v2
    assert {h.id[0] for (v, _), r in expected.items() if v == v2 for h in r.hits} == {"t"}  # the new corpus


def test_an_unloadable_version_keeps_the_old_one_serving(tmp_path, served_index, local_index, served_lm, caplog):
    from forvalue.indexer.index import Index
    from forvalue.indexer.store import IndexRoot

    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    index_root = IndexRoot(root)
    v1 = index_root.current()
    srv = _server((str(root),), lambda: Index.open(str(root), served_lm), watch_seconds=0)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            # a "new version" with a damaged data file: it fails its checksum on load
            shutil.copytree(root / "versions" / v1, root / "versions" / "v000002")
            victim = next(p for p in sorted((root / "versions" / "v000002").rglob("*.npy")) if p.stat().st_size > 128)
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0xFF
            Path(victim).write_bytes(bytes(data))
            index_root.set_current("v000002")
            with caplog.at_level(logging.ERROR, "forvalue.server"):
                assert srv.run(srv.server.reload()) == v1
            assert any("v000002 could not be loaded" in r.getMessage() for r in caplog.records)
            assert_response(stub.TopK(request([QUERIES[0]]), timeout=60), request([QUERIES[0]]), local_index)
            # the next good version is picked up
            shutil.copytree(root / "versions" / v1, root / "versions" / "v000003")
            index_root.set_current("v000003")
            assert srv.run(srv.server.reload()) == "v000003"
            response = stub.TopK(request([QUERIES[0]]), timeout=60)
            assert response.index_version == "v000003"
            assert_response(response, request([QUERIES[0]]), Index.open(str(root), served_lm, version="v000003"))
    finally:
        srv.stop()
