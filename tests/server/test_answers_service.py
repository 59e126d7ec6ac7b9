"""Filters, group-by, calibrated scores and the admin Delete over gRPC (issue 10): answers equal the
in-process library's, bad fields get INVALID_ARGUMENT naming them, Delete is off unless enabled."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.filters import Where
from forvalue.indexer.index import Index
from forvalue.server.config import ServerConfig
from forvalue.server.protocol import pb, pb_grpc

from serving import ServerThread, corpus

QUERIES = corpus(2, seed=7, prefix="q")


def _same_hits(remote, local):
    assert [h.id for h in remote] == [h.id for h in local]
    np.testing.assert_allclose([h.score for h in remote], [h.score for h in local], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["most", "least"])
def test_filtered_search_equals_in_process(influence_server, local_index, served_index, direction):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        for where in ({"source": "a"}, {"source": ["a", "b"], "n_words": 3}, ["n_words=2", "n_words=4"]):
            remote = c.search(QUERIES[:1], k=4, direction=direction, rerank=36, where=where)
            from forvalue.indexer.filters import as_where

            local = local_index.search(QUERIES[:1], k=4, direction=direction, rerank=36, where=as_where(where))
            _same_hits(remote.hits, local.hits)
            w = as_where(where)
            assert all(w.matches(h.metadata) for h in remote.hits)
            # calibrated scores travel with every hit
            for r, loc in zip(remote.hits, local.hits):
                assert r.percentile == pytest.approx(loc.percentile) and r.cosine == pytest.approx(loc.cosine)
                assert 0 <= r.percentile <= 1 and -1 <= r.cosine <= 1
                assert r.percentile_low == r.percentile_high == pytest.approx(loc.percentile)  # exact: 36 rows
                assert r.percentile_exact


def test_group_by_and_score_all_with_where(influence_server, local_index):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        remote = c.group_by(QUERIES, "source", k=2, direction="most")
        local = local_index.group_by(QUERIES, "source", k=2)
        assert [g.key for g in remote.groups] == [g.key for g in local.groups] and len(remote.groups) == 2
        for rg, lg in zip(remote.groups, local.groups):
            assert rg.count == lg.count and rg.total == pytest.approx(lg.total, rel=1e-5, abs=1e-6)
            _same_hits(rg.hits, lg.hits)
        assert remote.scored == 36
        ids, scores = c.score_all(QUERIES, where={"source": "b"})
        want = local_index.scores([], Where.of([("source", "b")]), features=local_index.encode(QUERIES))
        assert len(ids) == 18 and ids == [local_index.version.rows([r])[0]["id"] for r in want.rows]
        np.testing.assert_allclose(scores, want.values, rtol=1e-5, atol=1e-6)


def test_scores_carry_cosines_in_one_call_only(influence_server, local_index):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        remote = c.scores(QUERIES, where={"source": "a"})
        local = local_index.scores(QUERIES, Where.of([("source", "a")]))
        assert remote.rows == local.rows and remote.cosines is not None
        np.testing.assert_allclose(remote.cosines, local.cosines, rtol=1e-5, atol=1e-6)
        assert np.all(np.abs(remote.cosines) <= 1)
        # two calls (batch=1) each know only their own sample's mean G: no cosine rather than a wrong one
        split = c.scores(QUERIES, batch=1)
        assert split.cosines is None and len(split.values) == 36


@pytest.mark.parametrize("request_kwargs, field", [
    (dict(where=[pb.FieldFilter(field="prompt", values=[])]), "where[0].field"),
    (dict(where=[pb.FieldFilter(field="source")]), "where[0].values"),
    (dict(group_by="response"), "group_by"),
    (dict(group_by="source", explain=True), "explain"),
])
def test_bad_fields_are_invalid_argument(influence_server, request_kwargs, field):
    stub = pb_grpc.InfluenceStub(grpc.insecure_channel(influence_server.address))
    req = pb.TopKRequest(samples=[pb.ValuationSample(prompt="p", response=" r")], k=3, **request_kwargs)
    with pytest.raises(grpc.RpcError) as err:
        stub.TopK(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


def test_unknown_field_is_invalid_argument(influence_server):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        with pytest.raises(ServerError) as err:
            c.search(QUERIES[:1], k=3, where={"sourse": "a"})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "sourse" in str(err.value)


def test_delete_is_off_unless_enabled(influence_server):
    with InfluenceClient(influence_server.address, timeout=30) as c:
        with pytest.raises(ServerError) as err:
            c.delete(["s1"])
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_admin_delete_publishes_and_serves_a_version_without_them(tmp_path, served_index, served_model_dir, served_lm):
    root = tmp_path / "idx"
    shutil.copytree(served_index[0], root)
    srv = ServerThread(ServerConfig(index_dir=str(root), model_path=served_model_dir, admin=True, watch_seconds=0))
    try:
        srv.wait_ready()
        with InfluenceClient(srv.address, timeout=60) as c:
            before = c.search(QUERIES[:1], k=5, rerank=36)
            gone = [before.hits[0].id, before.hits[3].id]
            with pytest.raises(ServerError) as err:
                c.delete(gone + ["no-such-id"])
            assert err.value.code == grpc.StatusCode.NOT_FOUND and "no-such-id" in str(err.value)
            assert c.info()["index_version"] == before.version  # refused whole
            reply = c.delete(gone)
            assert reply["deleted"] == sorted(gone) and reply["hidden_rows"] == 2
            assert reply["index_version"] != before.version
            after = c.search(QUERIES[:1], k=5, rerank=36)
            assert after.version == reply["index_version"]  # served before Delete answered
            local = Index.open(str(root), served_lm).search(QUERIES[:1], k=5, rerank=36)
            _same_hits(after.hits, local.hits)
            assert not {h.id for h in after.hits} & set(gone)
            ids, _ = c.score_all(QUERIES[:1])
            assert len(ids) == 34 and not set(ids) & set(gone)
            again = c.delete(gone[:1])
            assert again["deleted"] == [] and again["already_deleted"] == gone[:1]
            with pytest.raises(ServerError) as err:
                c.delete([])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "ids" in str(err.value)
    finally:
        srv.stop()


@pytest.mark.parametrize("direction", ["most", "least"])
def test_certified_search_equals_in_process(influence_server, local_index, direction):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        for budget in (0, 3):
            remote = c.search(QUERIES, k=5, direction=direction, rerank=20, scores="certified", exact_budget=budget)
            local = local_index.search(QUERIES, k=5, direction=direction, rerank=20, scores="certified",
                                       exact_budget=budget)
            _same_hits(remote.hits, local.hits)
            assert remote.scores == local.scores == "certified"
            assert (remote.set_certified, remote.exact_scored) == (local.set_certified, local.exact_scored)
            assert remote.exact_scored <= budget
            for r, loc in zip(remote.hits, local.hits):
                assert (r.score_low, r.score_high, r.rank_certified) == (loc.score_low, loc.score_high,
                                                                        loc.rank_certified)
                assert r.score_low <= r.score <= r.score_high and r.percentile is None
        exact = c.search(QUERIES, k=5, direction=direction, rerank=20)  # the default stays exact
        assert exact.scores == "exact" and exact.set_certified is None and exact.hits[0].score_low is None


def test_certified_request_checks(influence_server):
    stub = pb_grpc.InfluenceStub(grpc.insecure_channel(influence_server.address))
    sample = pb.ValuationSample(prompt=QUERIES[0].prompt, response=QUERIES[0].response)
    for request, field in ((pb.TopKRequest(samples=[sample], k=3, scores=7), "scores"),
                           (pb.TopKRequest(samples=[sample], k=3, scores=pb.CERTIFIED, exact_budget=-2), "exact_budget"),
                           (pb.TopKRequest(samples=[sample], k=3, scores=pb.CERTIFIED, group_by="source"), "scores")):
        with pytest.raises(grpc.RpcError) as err:
            stub.TopK(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
