"""What the command line prints (client/render.py), from hand-made results: the query table, the group-by
table and JSON."""

from __future__ import annotations

import json

from forvalue.client.render import dumps, groups_json, groups_text, hits_json, hits_text, snippet
from forvalue.indexer.results import Group, GroupedResult, Hit, SearchResult


def _result(exact_scored=None):
    hits = [Hit(id="s12", score=0.5, rank=1, row=12, metadata={"prompt": "Upper: sky ->", "response": " SKY"},
                percentile=0.875, cosine=0.25, percentile_low=0.875, percentile_high=0.875),
            Hit(id="s3", score=-0.0125, rank=2, row=3, metadata={"prompt": "Reverse: a b ->", "response": " b a"})]
    return SearchResult(hits=hits, version="v000002", direction="most", candidates=8, exact_scored=exact_scored)


def test_hits_text():
    lines = hits_text(_result(), "index out/idx", 1).split("\n")
    assert lines[0] == ("index out/idx, version v000002: the 2 most valuable training samples for the valuation "
                        "sample (8 candidates, all scored exactly)")
    assert lines[1].split() == ["rank", "score", "pct", "cos", "id", "training", "sample", "(prompt", "→",
                                "response)"]
    assert lines[2].split() == ["1", "0.5", "87.5%", "+0.250", "s12", "Upper:", "sky", "->", "→", "SKY"]
    assert lines[3].split() == ["2", "-0.0125", "-", "-", "s3", "Reverse:", "a", "b", "->", "→", "b", "a"]
    assert len(lines) == 4
    group = hits_text(_result(exact_scored=3), "server h:1", 4).split("\n")[0]
    assert "for the mean of 4 valuation samples (8 candidates, 3 scored exactly)" in group


def test_hits_json():
    d = json.loads(dumps(hits_json(_result(), "index x", 1)))
    assert (d["source"], d["version"], d["direction"], d["candidates"], d["n_queries"]) == (
        "index x", "v000002", "most", 8, 1)
    assert [(h["rank"], h["id"], h["row"], h["score"], h["percentile"], h["cosine"]) for h in d["hits"]] == [
        (1, "s12", 12, 0.5, 0.875, 0.25), (2, "s3", 3, -0.0125, None, None)]
    assert "explanation" not in d["hits"][0]
    assert (d["hits"][0]["percentile_low"], d["hits"][0]["percentile_high"]) == (0.875, 0.875)


def test_percentile_shown_exact_as_an_interval_or_as_an_estimate():
    from forvalue.client.render import color_hits, hit_pct

    def hit(p, low=None, high=None):
        return Hit(id="a", score=1.0, rank=1, row=0, metadata={}, percentile=p, percentile_low=low, percentile_high=high)

    assert hit_pct(hit(0.984375, 0.984375, 0.984375)) == "98.4%"
    assert hit_pct(hit(0.99, 0.9712, 0.9968)) == "97.1–99.7%"
    assert hit_pct(hit(0.99)) == "~99.0%"  # a router or an older server: not said to be exact
    assert hit_pct(hit(None)) == "-"
    result = SearchResult(hits=[hit(0.99, 0.9712, 0.9968)], version="v1", direction="most", candidates=1)
    assert hits_text(result, "x", 1).split("\n")[2].split()[2] == "97.1–99.7%"
    assert "97.1–99.7%" in color_hits(result, "x", 1, False, width=120)


def _grouped():
    hit = Hit(id="s1", score=1.5, rank=1, row=1, metadata={})
    return GroupedResult(field="source", version="v000001", direction="least", scored=9,
                         groups=[Group(key="gsm8k", count=6, total=3.0, mean=0.5, hits=[hit]),
                                 Group(key=None, count=3, total=-1.5, mean=-0.5, hits=[])])


def test_groups_text_and_json():
    lines = groups_text(_grouped(), "index x").split("\n")
    assert lines[0] == ("index x, version v000001: value by source (9 training samples scored exactly, least valuable "
                        "first)")
    assert lines[1].split() == ["source", "count", "total", "mean", "top", "samples"]
    assert lines[2].split() == ["gsm8k", "6", "3", "0.5", "s1", "(1.5)"]
    assert lines[3].split() == ["(missing)", "3", "-1.5", "-0.5"]
    d = groups_json(_grouped(), "index x", 2)
    assert [(g["key"], g["count"], g["total"], g["mean"], [h["id"] for h in g["hits"]]) for g in d["groups"]] == [
        ("gsm8k", 6, 3.0, 0.5, ["s1"]), (None, 3, -1.5, -0.5, [])]
    assert (d["field"], d["scored"], d["n_queries"]) == ("source", 9, 2)


def test_snippet_cuts_to_width():
    meta = {"prompt": "Upper:   sky\nsea ->", "response": " SKY SEA"}
    assert snippet(meta) == "Upper: sky sea -> → SKY SEA"
    assert snippet(meta, 10) == "Upper: sk…" and len(snippet(meta, 10)) == 10
    assert snippet(meta, 1) == ""
