"""The servicer (server/servicer.py) on localhost (port 0) through the real client: answers equal the in-process
Index; a bad request is INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from forvalue.server.protocol import pb, pb_grpc

from serving import corpus, pb_samples

QUERIES = [(s.prompt, s.response) for s in corpus(3, seed=7, prefix="q")]
RERANK = 12  # below the 36 rows: the FAISS first stage chooses the candidates


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


def test_conversation_query_equals_in_process(client, local_index):
    """A conversation travels as messages and is tokenised on the server as in process (chat.py)."""
    from forvalue.indexer.formats import Chat

    chat = Chat((("system", "Be brief."), ("user", QUERIES[0][0]), ("assistant", QUERIES[0][1]),
                 ("user", "again"), ("assistant", QUERIES[1][1])), (2, 4))
    q = [("shown", "only", chat)]
    remote, local = client.search(q, k=5, rerank=RERANK), local_index.search(q, k=5, rerank=RERANK)
    assert_same(remote, local)
    last = local_index.search([("shown", "only", Chat(chat.messages, (4,)))], k=5, rerank=RERANK)
    assert [h.score for h in last.hits] != [h.score for h in local.hits]


def test_info(client, local_index):
    info = client.info()
    m = local_index.manifest
    assert info["index_version"] == local_index.version.name
    assert (info["model_name"], info["model_fingerprint"]) == (m["model"]["name"], m["model"]["fingerprint"])
    assert (info["tokens"], info["n_samples"], info["sketch_dim"], info["index_kind"]) == (
        "response", 36, 4 * 32, "flat-ip")
    assert "files" not in info["manifest"] and info["manifest"]["sketch"] == m["sketch"]


BAD = [
    ("TopK", pb.TopKRequest(k=3), "samples"),
    ("TopK", pb.TopKRequest(samples=pb_samples(("p", "  ")), k=3), "samples[0].response"),
    ("TopK", pb.TopKRequest(samples=pb_samples(("p", " r")), k=0), "k"),
    ("TopK", pb.TopKRequest(samples=pb_samples(("p", " r")), k=21), "k"),  # the fixture's k_cap is 20
    ("TopK", pb.TopKRequest(samples=pb_samples(("p", " r")), k=3, direction=9), "direction"),
    ("TopK", pb.TopKRequest(samples=pb_samples(("p", " r")), k=3, rerank=-5), "rerank"),
    ("TopK", pb.TopKRequest(samples=[pb.ValuationSample(response=" r", image=b"\x89PNG", image_mime_type="image/png")],
                            k=3), "samples[0].image"),
    ("ScoreAll", pb.ScoreAllRequest(samples=pb_samples(("p", ""))), "samples[0].response"),
    ("TopK", pb.TopKRequest(samples=[pb.ValuationSample(messages=[pb.ChatMessage(role="user", content="hi")],
                                                        scored_turns=[0])], k=3), "samples[0].scored_turns"),
    ("TopK", pb.TopKRequest(samples=[pb.ValuationSample(messages=[pb.ChatMessage(role="bot", content="hi")],
                                                        scored_turns=[0])], k=3), "samples[0].messages[0].role"),
    ("ScoreAll", pb.ScoreAllRequest(samples=pb_samples(("p", " r")), chunk_size=-2), "chunk_size"),
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
