"""Explanations over gRPC: a real server on port 0, the tiny model; totals equal the hit scores."""

from __future__ import annotations

import grpc
import pytest

from forvalue.client.client import InfluenceClient, ServerError
from forvalue.indexer.results import Explanation, Hit, PairContribution, TokenContribution
from forvalue.server import convert
from forvalue.server.config import ServerConfig
from forvalue.indexer.errors import InvalidRequestError
from forvalue.server.protocol import pb, pb_grpc

from serving import corpus

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]
RERANK = 12


@pytest.fixture(scope="module")
def client(influence_server):
    with InfluenceClient(influence_server.address, timeout=60) as c:
        yield c


def _assert_explanations_match(remote, local):
    assert [h.id for h in remote.hits] == [h.id for h in local.hits]
    for r, l in zip(remote.hits, local.hits):
        e = r.explanation
        assert e is not None
        assert e.total == pytest.approx(r.score, rel=1e-5, abs=1e-4)          # the total is the hit's score
        assert sum(t.contribution for t in e.query_tokens) == pytest.approx(r.score, rel=1e-5, abs=1e-4)
        assert sum(t.contribution for t in e.train_tokens) == pytest.approx(r.score, rel=1e-5, abs=1e-4)
        assert [(t.token, t.position, t.sample) for t in e.query_tokens] == \
               [(t.token, t.position, t.sample) for t in l.explanation.query_tokens]
        assert [(p.query_position, p.train_position, p.query_sample) for p in e.top_pairs] == \
               [(p.query_position, p.train_position, p.query_sample) for p in l.explanation.top_pairs]
        assert [p.contribution for p in e.top_pairs] == pytest.approx(
            [p.contribution for p in l.explanation.top_pairs], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("n_queries", [1, 3])
def test_explained_hits_equal_in_process(client, local_index, direction, n_queries):
    q = QUERIES[:n_queries]
    remote = client.search(q, k=4, direction=direction, rerank=RERANK, explain=3)
    local = local_index.search(q, k=4, direction=direction, rerank=RERANK, explain=3)
    _assert_explanations_match(remote, local)
    assert all(len(h.explanation.top_pairs) == 3 for h in remote.hits)


def test_per_sample_answers_both_directions(client, local_index):
    answers = client.top_k(QUERIES[:2], k=3, direction="both", rerank=RERANK, group=False, explain=2)
    assert [(i, r.direction) for i, r in answers] == [(0, "most"), (0, "least"), (1, "most"), (1, "least")]
    for i, result in answers:
        local = local_index.search([QUERIES[i]], k=3, direction=result.direction, rerank=RERANK, explain=2)
        _assert_explanations_match(result, local)
        assert {t.sample for h in result.hits for t in h.explanation.query_tokens} == {0}


def test_no_explanation_unless_asked(client):
    res = client.search(QUERIES[:1], k=3, rerank=RERANK)
    assert all(h.explanation is None for h in res.hits)
    raw = pb_grpc.InfluenceStub(client._channel).TopK(
        pb.TopKRequest(samples=convert.samples_to_pb(QUERIES[:1]), k=2, explain_pairs=5))  # pairs without explain
    assert not any(h.HasField("explanation") for a in raw.answers for h in a.hits)


def test_server_default_pairs(client):
    raw = pb_grpc.InfluenceStub(client._channel).TopK(
        pb.TopKRequest(samples=convert.samples_to_pb(QUERIES[:1]), k=2, explain=True))
    default = ServerConfig(index_dir="unused").default_explain_pairs
    for hit in raw.answers[0].hits:
        e = hit.explanation
        assert len(e.top_pairs) == min(default, len(e.query_tokens) * len(e.train_tokens)) == default


@pytest.mark.parametrize("pairs", [-1, 101, 10**6])
def test_bad_explain_pairs_is_invalid_argument(client, pairs):
    stub = pb_grpc.InfluenceStub(client._channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.TopK(pb.TopKRequest(samples=convert.samples_to_pb(QUERIES[:1]), k=2, explain=True, explain_pairs=pairs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "explain_pairs" in err.value.details() and str(pairs) in err.value.details()


def test_client_explain_errors(client):
    with pytest.raises(ServerError) as err:
        client.search(QUERIES[:1], k=2, explain=101)  # above the server's cap (100)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "explain_pairs" in err.value.details
    with pytest.raises(ValueError, match="explain must be >= 0"):
        client.search(QUERIES[:1], k=2, explain=-1)


# --- conversions and validation, without a server -----------------------------------------------------

CFG = ServerConfig(index_dir="unused", default_explain_pairs=4, max_explain_pairs=6)


def _request(**kw):
    return pb.TopKRequest(samples=[pb.ValuationSample(prompt="p", response=" r")], k=2, **kw)


def test_topk_query_explain_pairs():
    assert convert.topk_query(_request(), CFG).explain_pairs == 0
    assert convert.topk_query(_request(explain_pairs=3), CFG).explain_pairs == 0  # no explain: ignored
    assert convert.topk_query(_request(explain=True), CFG).explain_pairs == 4       # server default
    assert convert.topk_query(_request(explain=True, explain_pairs=6), CFG).explain_pairs == 6
    for bad in (-1, 7):
        with pytest.raises(InvalidRequestError) as err:
            convert.topk_query(_request(explain=True, explain_pairs=bad), CFG)
        assert err.value.field == "explain_pairs" and "between 0" in str(err.value)


def test_server_config_checks_explain_limits():
    with pytest.raises(ValueError, match="default_explain_pairs"):
        ServerConfig(index_dir="unused", default_explain_pairs=0)
    with pytest.raises(ValueError, match="max_explain_pairs"):
        ServerConfig(index_dir="unused", default_explain_pairs=20, max_explain_pairs=10)


def test_explanation_round_trip():
    e = Explanation(query_tokens=[TokenContribution("a", 0, 1.5, 0), TokenContribution("<b>", 1, -2.25, 1)],
                    train_tokens=[TokenContribution(" é\n", 0, -0.75)],
                    top_pairs=[PairContribution(1, 0, "<b>", " é\n", -2.25, 1)], total=-0.75)
    hit = Hit(id="x", score=-0.75, rank=1, row=3, metadata={"id": "x", "prompt": "p", "response": "r"},
              explanation=e)
    back = convert.hit_from_pb(pb.Hit.FromString(convert.hit_to_pb(hit).SerializeToString()))
    assert back.explanation == e
    plain = Hit(id="x", score=1.0, rank=1, row=0, metadata={})
    assert not convert.hit_to_pb(plain).HasField("explanation")
    assert convert.hit_from_pb(convert.hit_to_pb(plain)).explanation is None
