"""The shard router (forvalue serve --shards): three shard servers on loopback against the one-index answers."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

pytest.importorskip("faiss")

from forvalue.client.client import InfluenceClient, ServerError  # noqa: E402
from forvalue.server import convert  # noqa: E402
from forvalue.server.config import ServerConfig  # noqa: E402
from forvalue.server.protocol import pb, pb_grpc  # noqa: E402
from forvalue.server.router import RouterConfig, create_router, merge_answers  # noqa: E402

from serving import ServerThread, block_model  # noqa: E402

N_SHARDS = 3
QUERY = [("Reverse: red cat ->", " cat red"), ("Upper: sun moon ->", " SUN MOON")]


class RouterThread(ServerThread):
    """A router from `create_router` on its own event loop in a daemon thread."""

    def __init__(self, config: RouterConfig):  # noqa: super().__init__ builds an InfluenceServer; not here
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-router-loop", daemon=True)
        self.thread.start()

        async def start():
            server, port = create_router(config, "127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = self.run(start())
        self.address = f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory, served_lm, served_index):
    """The served corpus (36 samples) cut into three contiguous parts, one index each."""
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig, SketchConfig

    samples = served_index[1]
    dirs = []
    for s in range(N_SHARDS):
        part = samples[s * 12 : (s + 1) * 12]
        root = tmp_path_factory.mktemp(f"shard{s}")
        cfg = BuildConfig(sketch=SketchConfig(rank=4, buckets=32, fit_samples=12), shard_size=8)
        build_index(str(root), part, served_lm, cfg)
        dirs.append(str(root))
    return dirs


def _shard_server(index_dir: str, model_dir: str) -> ServerThread:
    srv = ServerThread(ServerConfig(index_dir=index_dir, model_path=model_dir, k_cap=50, batch_wait_ms=0))
    srv.wait_ready()
    return srv


@pytest.fixture(scope="module")
def shards(shard_dirs, served_model_dir):
    servers = [_shard_server(d, served_model_dir) for d in shard_dirs]
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.fixture(scope="module")
def router(shards):
    r = RouterThread(RouterConfig(shards=tuple(s.address for s in shards)))
    try:
        yield r
    finally:
        r.stop()


def _same_hits(got, want, k):
    """Same ids in the same order (no near-ties in this corpus), same exact scores to float tolerance."""
    assert [h.id for h in got.hits] == [h.id for h in want.hits][:k]
    np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits][:k], rtol=1e-5, atol=1e-6)
    assert [h.rank for h in got.hits] == list(range(1, len(got.hits) + 1))


@pytest.mark.parametrize("k", [5, 20])  # 20 > the 12 rows of one shard
@pytest.mark.parametrize("direction", ["most", "least", "both"])
@pytest.mark.parametrize("group", [True, False])
def test_merged_answers_equal_the_single_index(router, shards, local_index, k, direction, group):
    with InfluenceClient(router.address) as c:
        answers = c.top_k(QUERY, k=k, direction=direction, rerank=36, group=group)
    features = local_index.encode(QUERY)
    want = []
    for q in ([-1] if group else range(len(QUERY))):
        f = features if q == -1 else features.select([q])
        for d in (("most", "least") if direction == "both" else (direction,)):
            want.append((q, local_index.search([], k, d, rerank=36, features=f)))
    assert [(q, r.direction) for q, r in answers] == [(q, r.direction) for q, r in want]
    for (_, got), (_, ref) in zip(answers, want):
        _same_hits(got, ref, k)
        assert got.version == "+".join(["v000001"] * N_SHARDS)
        assert got.candidates == 36  # every row of every shard was a candidate


def test_response_names_the_shards(router, shards):
    stub = pb_grpc.InfluenceStub(grpc.insecure_channel(router.address))
    reply = stub.TopK(pb.TopKRequest(samples=convert.samples_to_pb(QUERY[:1]), k=3), timeout=30)
    assert list(reply.shards_answered) == [s.address for s in shards] and not reply.shards_failed


def test_score_all_concatenates_the_shards(router, local_index):
    with InfluenceClient(router.address) as c:
        ids, scores, version = c.score_all(QUERY, chunk_size=5, return_version=True)
    ref = local_index.score_matrix(local_index.encode(QUERY)).mean(0).numpy()
    assert ids == [f"s{i}" for i in range(36)]  # the shards hold contiguous parts, in shard order
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)
    assert version == "+".join(["v000001"] * N_SHARDS)


def test_info_reports_the_shards(router, shards, local_index):
    with InfluenceClient(router.address) as c:
        info = c.info()
    assert info["n_samples"] == 36 and info["model_fingerprint"] == local_index.manifest["model"]["fingerprint"]
    listed = info["manifest"]["router"]["shards"]
    assert [s["address"] for s in listed] == [s.address for s in shards]
    assert all(s["ok"] and s["n_samples"] == 12 for s in listed)


def test_bad_request_is_invalid_argument_through_the_router(router):
    with InfluenceClient(router.address) as c, pytest.raises(ServerError) as err:
        c.top_k(QUERY, k=0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k" in err.value.details


def test_one_shard_stopped(shards, shard_dirs, served_model_dir, local_index):
    """Down: UNAVAILABLE naming it; with allow_partial: the merge of the others, the shard listed as failed."""
    third = _shard_server(shard_dirs[2], served_model_dir)
    r = RouterThread(RouterConfig(shards=(shards[0].address, shards[1].address, third.address)))
    stub = pb_grpc.InfluenceStub(grpc.insecure_channel(r.address))
    request = pb.TopKRequest(samples=convert.samples_to_pb(QUERY), k=5, rerank=36, group=True)
    try:
        assert len(stub.TopK(request, timeout=30).shards_answered) == 3
        third.stop()
        with pytest.raises(grpc.RpcError) as err:
            stub.TopK(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and third.address in err.value.details()
        assert "allow_partial" in err.value.details()

        request.allow_partial = True
        reply = stub.TopK(request, timeout=30)
        assert list(reply.shards_answered) == [shards[0].address, shards[1].address]
        assert len(reply.shards_failed) == 1 and reply.shards_failed[0].startswith(f"{third.address}: UNAVAILABLE")
        assert reply.index_version == "v000001+v000001"
        # the reference: the exact top-5 of the rows of shards 0 and 1 (s0..s23)
        exact = local_index.score_matrix(local_index.encode(QUERY)).mean(0).numpy()[:24]
        want = np.argsort(-exact, kind="stable")[:5]
        assert [h.id for h in reply.answers[0].hits] == [f"s{i}" for i in want]
        np.testing.assert_allclose([h.score for h in reply.answers[0].hits], exact[want], rtol=1e-5, atol=1e-6)

        for call in (lambda: InfluenceClient(r.address).score_all(QUERY),):
            with pytest.raises(ServerError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and third.address in err.value.details
        info = InfluenceClient(r.address).info()
        assert info["n_samples"] == 24
        assert [s["ok"] for s in info["manifest"]["router"]["shards"]] == [True, True, False]
    finally:
        r.stop()


def test_a_slow_shard_and_the_callers_deadline(router, shards):
    """A shard that cannot answer in time: DEADLINE_EXCEEDED; with allow_partial, an answer without it."""
    stub = pb_grpc.InfluenceStub(grpc.insecure_channel(router.address))
    request = pb.TopKRequest(samples=convert.samples_to_pb(QUERY[:1]), k=3)
    gate = block_model(shards[1])
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.TopK(request, timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        request.allow_partial = True
        reply = stub.TopK(request, timeout=3)
        assert list(reply.shards_answered) == [shards[0].address, shards[2].address]
        assert reply.shards_failed[0].startswith(f"{shards[1].address}: DEADLINE_EXCEEDED")
    finally:
        gate.set()


def test_merge_is_exact_on_ties_and_groups():
    """merge_answers against a plain sort: scores, then shard order, then the shard's rank; groups summed."""
    def hit(i, score, rank):
        return pb.Hit(id=f"x{i}", score=score, rank=rank, percentile=0.5, percentile_low=0.5, percentile_high=0.5)

    a = pb.Answer(direction=pb.MOST, candidates=3, exact_scored=2, hits=[hit(0, 3.0, 1), hit(1, 1.0, 2)],
                  groups=[pb.Group(key="a", count=2, total=4.0, mean=2.0, hits=[hit(0, 3.0, 1)])])
    b = pb.Answer(direction=pb.MOST, candidates=4, exact_scored=4, hits=[hit(2, 3.0, 1), hit(3, 2.0, 2)],
                  groups=[pb.Group(key="a", count=1, total=-1.0, mean=-1.0, hits=[hit(3, 2.0, 1)]),
                          pb.Group(key="b", count=1, total=5.0, mean=5.0)])
    m = merge_answers([(0, a), (1, b)], k=3)
    assert [h.id for h in m.hits] == ["x0", "x2", "x3"] and [h.rank for h in m.hits] == [1, 2, 3]
    assert (m.candidates, m.exact_scored) == (7, 6)
    # a shard's percentile stays, but not its claim to be exact: that was among the shard's rows only
    assert all(h.percentile == 0.5 and not h.HasField("percentile_low") and not h.HasField("percentile_high")
               for h in m.hits)
    assert [(g.key, g.count, g.total, g.mean) for g in m.groups] == [("b", 1, 5.0, 5.0), ("a", 3, 3.0, 1.0)]
    least = merge_answers([(0, pb.Answer(direction=pb.LEAST, hits=[hit(0, -1.0, 1)])),
                           (1, pb.Answer(direction=pb.LEAST, hits=[hit(1, -2.0, 1)]))], k=5)
    assert [h.id for h in least.hits] == ["x1", "x0"]


def test_router_config_checks():
    from forvalue.indexer.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one"):
        RouterConfig(shards=())
    with pytest.raises(ConfigError, match="host:port"):
        RouterConfig(shards=("nohost",))
    with pytest.raises(ConfigError, match="twice"):
        RouterConfig(shards=("a:1", "a:1"))


def test_cli_serve_shards_routes(shards, local_index):
    """forvalue serve --shards A,B,C: a router process answering like the one index."""
    import re

    from serving import expect_line, serve_process

    addresses = ",".join(s.address for s in shards)
    with serve_process(["--shards", addresses, "--port", "0"]) as (proc, lines):
        line = expect_line(lines, "routing 3 shards")
        port = re.search(r":(\d+)\s*$", line).group(1)
        with InfluenceClient(f"127.0.0.1:{port}", timeout=60) as c:
            got = c.search(QUERY, k=4, rerank=36)
        _same_hits(got, local_index.search(QUERY, k=4, rerank=36), 4)
        proc.terminate()
        assert proc.wait(30) == 0


def test_cli_serve_needs_index_or_shards():
    from click.testing import CliRunner

    from forvalue.client.cli import main

    none = CliRunner().invoke(main, ["serve"])
    assert none.exit_code == 2 and "--index DIR" in none.output
    both = CliRunner().invoke(main, ["serve", "--index", "x", "--shards", "a:1"])
    assert both.exit_code == 2 and "not both" in both.output
