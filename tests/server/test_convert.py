"""Request validation (each bad field named) and protobuf ↔ domain conversions, without a server."""

from __future__ import annotations

import dataclasses

import pytest

from forvalue.indexer.errors import ConfigError, ForValueError
from forvalue.indexer.results import GROUP, Hit, SearchResult
from forvalue.server import convert
from forvalue.server.config import ServerConfig
from forvalue.indexer.errors import InvalidRequestError
from forvalue.server.protocol import pb

CFG = ServerConfig(index_dir="unused", k_cap=20, default_rerank=30, max_rerank=50, max_samples=3,
                   default_chunk=8, max_chunk=100)


def sample(prompt="p", response=" r", **kw):
    return pb.ValuationSample(prompt=prompt, response=response, **kw)


def topk(**kw):
    kw.setdefault("samples", [sample()])
    kw.setdefault("k", 5)
    return pb.TopKRequest(**kw)


BAD_TOPK = [
    (dict(samples=[]), "samples"),
    (dict(samples=[sample()] * 4), "samples"),
    (dict(samples=[sample(response="")]), "samples[0].response"),
    (dict(samples=[sample(), sample(response=" \n\t")]), "samples[1].response"),
    (dict(samples=[sample(image=b"\x89PNG", image_mime_type="image/png")]), "samples[0].image"),
    (dict(samples=[sample(image_mime_type="image/png")]), "samples[0].image_mime_type"),
    (dict(k=0), "k"),
    (dict(k=-3), "k"),
    (dict(k=21), "k"),
    (dict(direction=7), "direction"),
    (dict(rerank=-1), "rerank"),
    (dict(k=5, rerank=4), "rerank"),
    (dict(rerank=51), "rerank"),
    (dict(max_text_chars=-1), "max_text_chars"),
]


@pytest.mark.parametrize("fields,field", BAD_TOPK, ids=[f for _, f in BAD_TOPK])
def test_bad_topk_request_names_the_field(fields, field):
    with pytest.raises(InvalidRequestError) as err:
        convert.topk_query(topk(**fields), CFG)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")
    assert isinstance(err.value, ForValueError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("chunk", [-1, 101])
def test_bad_chunk_size(chunk):
    with pytest.raises(InvalidRequestError) as err:
        convert.score_all_query(pb.ScoreAllRequest(samples=[sample()], chunk_size=chunk), CFG)
    assert err.value.field == "chunk_size"


def test_good_requests_and_defaults():
    q = convert.topk_query(topk(samples=[sample(prompt=""), sample()], k=3, group=True), CFG)  # empty prompt ok
    assert q.samples == [("", " r"), ("p", " r")]
    assert (q.k, q.directions, q.rerank, q.group, q.max_text_chars) == (3, ("most",), 30, True, 0)
    assert convert.topk_query(topk(k=20), CFG).rerank == 30  # default rerank
    assert convert.topk_query(topk(k=20, rerank=20), CFG).rerank == 20
    assert convert.topk_query(topk(direction=pb.LEAST), CFG).directions == ("least",)
    assert convert.topk_query(topk(direction=pb.BOTH), CFG).directions == ("most", "least")
    assert convert.score_all_query(pb.ScoreAllRequest(samples=[sample()]), CFG).chunk_size == 8


def test_hit_round_trip_keeps_metadata_and_truncates():
    md = {"id": "s1", "prompt": "Reverse: a b ->", "response": " b a", "label": "Reverse", "clean": True,
          "meta": {"n": 3, "x": 0.5, "tags": ["a", 2], "none": None}}
    hit = Hit(id="s1", score=1.25, rank=2, row=7, metadata=md)
    msg = convert.hit_to_pb(hit)
    assert set(msg.metadata.keys()) == {"label", "clean", "meta"}  # id, prompt, response have fields
    assert not msg.truncated
    assert convert.hit_from_pb(pb.Hit.FromString(msg.SerializeToString())) == hit

    calibrated = dataclasses.replace(hit, percentile=0.75, cosine=0.5, percentile_low=0.7, percentile_high=0.8)
    back = convert.hit_from_pb(pb.Hit.FromString(convert.hit_to_pb(calibrated).SerializeToString()))
    assert back == calibrated and (back.percentile_low, back.percentile_high) == (0.7, 0.8)

    short = convert.hit_to_pb(hit, max_text_chars=4)
    assert (short.prompt, short.response, short.truncated) == ("Reve", " b a", True)


def test_answers_and_chunks():
    hits = [Hit(id=f"s{i}", score=float(-i), rank=i + 1, row=i, metadata={"id": f"s{i}", "prompt": "", "response": "r"})
            for i in range(3)]
    res = SearchResult(hits, "v000002", "least", 17)
    resp = convert.topk_response([(GROUP, res), (1, res)], "v000002")
    assert resp.index_version == "v000002" and [a.query_index for a in resp.answers] == [-1, 1]
    assert resp.answers[0].direction == pb.LEAST and resp.answers[0].candidates == 17
    assert convert.search_result(resp.answers[0], resp.index_version) == res

    ids, scores = [f"s{i}" for i in range(10)], [float(i) for i in range(10)]
    chunks = list(convert.score_chunks(ids, scores, 4, "v1"))
    assert [c.offset for c in chunks] == [0, 4, 8] and [len(c.ids) for c in chunks] == [4, 4, 2]
    assert [s for c in chunks for s in c.scores] == scores and {c.index_version for c in chunks} == {"v1"}
    assert all(not c.cosines for c in chunks)
    cos = [i / 10 for i in range(10)]
    with_cos = list(convert.score_chunks(ids, scores, 4, "v1", cosines=cos))
    assert [x for c in with_cos for x in c.cosines] == pytest.approx(cos)


def test_direction_names():
    assert [convert.direction_to_pb(d) for d in ("most", "least", "both")] == [pb.MOST, pb.LEAST, pb.BOTH]
    with pytest.raises(ConfigError):
        convert.direction_to_pb("sideways")


@pytest.mark.parametrize("bad", [dict(k_cap=0), dict(max_queue=0), dict(default_rerank=200, max_rerank=100),
                                 dict(grace_seconds=-1), dict(max_sample_chars=0)])
def test_server_config_validates(bad):
    with pytest.raises(ConfigError):
        ServerConfig(index_dir="x", **bad)
