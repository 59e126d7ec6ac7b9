"""1,000 concurrent TopK queries across two index swaps: every one OK, every response from one version and equal
to that version's in-process answer."""

from __future__ import annotations

import asyncio
import collections
import shutil
import threading

import grpc

from forvalue.server.protocol import pb, pb_grpc

from harness import QUERIES, assert_answer, reference, request, start, wait_for
from serving import corpus

N = 1000
SWAP_AT = (250, 550)  # answered queries before publishing v2, then v3


class Queries:
    """N TopK queries sent at once on one asyncio channel, on a thread of their own; `done` counts answers."""

    def __init__(self, address: str):
        self.results: list = [None] * N
        self.done = 0
        self._thread = threading.Thread(target=asyncio.run, args=(self._send(address),), daemon=True)
        self._thread.start()

    @staticmethod
    def directions(i: int) -> tuple[str, ...]:
        """Every 5th query asks for both directions: two answers in one response."""
        return ("most", "least") if i % 5 == 4 else ("most",)

    async def _one(self, stub, i: int) -> None:
        req = request([QUERIES[i % len(QUERIES)]], direction=pb.BOTH if len(self.directions(i)) == 2 else pb.MOST)
        try:
            self.results[i] = await stub.TopK(req, timeout=120)
        except grpc.RpcError as exc:
            self.results[i] = exc
        self.done += 1  # on this thread's loop only; read (not written) elsewhere

    async def _send(self, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InfluenceStub(channel)
            await asyncio.gather(*(self._one(stub, i) for i in range(N)))

    def join(self, timeout: float) -> list:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{N - self.done} queries still unanswered after {timeout} s"
        return self.results


def _build_config(n: int):
    from forvalue.indexer.config import BuildConfig, SketchConfig

    return BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=n), shard_size=16)


def test_1000_queries_across_two_swaps(tmp_path, served_index, served_lm):
    from forvalue.indexer.build import build_index
    from forvalue.indexer.index import Index
    from forvalue.indexer.store import IndexRoot

    root = str(tmp_path / "index")
    shutil.copytree(served_index[0], root)  # the session's index stays as it is
    index_root = IndexRoot(root)
    v1 = index_root.current()
    # two new versions over other corpora (their hits have other ids), built now and published one after
    # the other while the queries run: what `forvalue index build` does last (CURRENT moves atomically)
    v2 = build_index(root, corpus(30, seed=3, prefix="t"), served_lm, _build_config(30))
    v3 = build_index(root, corpus(33, seed=5, prefix="u"), served_lm, _build_config(33))
    index_root.set_current(v1)
    srv = start(root, lambda: Index.open(root, served_lm), watch_seconds=0)  # swaps by reload()
    try:
        queries = Queries(srv.address)
        swapped = {}
        for version, at in zip((v2, v3), SWAP_AT):
            wait_for(lambda: queries.done >= at, timeout=120, what=f"{at} answers before publishing {version}")
            index_root.set_current(version)
            assert srv.run(srv.server.reload()) == version
            swapped[version] = queries.done  # answers before the new version served
        results = queries.join(120)
        stats = srv.server.servicer.stats.snapshot()
    finally:
        srv.stop()

    errors = [r for r in results if not isinstance(r, pb.TopKResponse)]
    per_version = collections.Counter(r.index_version for r in results if isinstance(r, pb.TopKResponse))
    summary = (f"{N} queries: {len(errors)} failed; per version {dict(sorted(per_version.items()))}; swapped after "
               f"{swapped} answers; {stats['forward_passes']} forward passes")
    assert not errors, f"{summary}; first errors {errors[:3]}"
    # every version answered some: the swaps happened while queries were in flight
    assert set(per_version) == {v1, v2, v3} and min(per_version.values()) > 0, summary
    indexes = {v: Index.open(root, served_lm, version=v) for v in (v1, v2, v3)}
    expected = {}
    for i, response in enumerate(results):
        q = i % len(QUERIES)
        assert len(response.answers) == len(Queries.directions(i))
        for answer, direction in zip(response.answers, Queries.directions(i)):  # all from the named version
            key = (response.index_version, q, direction)
            if key not in expected:
                expected[key] = reference(indexes[key[0]], q, direction)
            assert_answer(answer, response.index_version, expected[key])
    prefixes = {v: {h.id[0] for (version, _, _), r in expected.items() if version == v for h in r.hits}
                for v in (v1, v2, v3)}
    assert prefixes == {v1: {"s"}, v2: {"t"}, v3: {"u"}}, prefixes  # each version's own corpus
    print(summary)
