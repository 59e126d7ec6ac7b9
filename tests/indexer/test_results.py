"""The answer types and their helpers (indexer/results.py): direction names, cutting texts, an index's info."""

from __future__ import annotations

import pytest

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.results import Hit, SearchResult, check_direction, cut_texts, index_info


def _result():
    return SearchResult(hits=[Hit(id="a", score=2.0, rank=1, row=4, metadata={"prompt": "Upper: sky ->",
                                                                              "response": " SKY", "meta": {"x": 1}}),
                              Hit(id="b", score=1.0, rank=2, row=0, metadata={"prompt": "p"})],
                        version="v000001", direction="most", candidates=5)


def test_check_direction():
    assert check_direction("most") == "most" and check_direction("least") == "least"
    assert check_direction("both", both=True) == "both"
    for bad, both in (("both", False), ("best", True), ("", False)):
        with pytest.raises(ConfigError, match="direction must be one of"):
            check_direction(bad, both=both)


def test_cut_texts():
    res = _result()
    assert cut_texts(res, 0) is res
    cut = cut_texts(res, 3)
    assert [h.metadata for h in cut.hits] == [{"prompt": "Upp", "response": " SK", "meta": {"x": 1}},
                                             {"prompt": "p"}]
    assert [(h.id, h.score, h.rank, h.row) for h in cut.hits] == [("a", 2.0, 1, 4), ("b", 1.0, 2, 0)]
    assert res.hits[0].metadata["prompt"] == "Upper: sky ->"  # the original is untouched
    assert (cut.version, cut.direction, cut.candidates) == ("v000001", "most", 5)


def test_index_info():
    manifest = {"model": {"name": "tiny", "fingerprint": "f00"}, "tokens": "all", "n_samples": 7,
                "sketch": {"dim": 12, "rank": 3}, "index": {"kind": "flat-ip"}, "files": {"a.npy": {}}}
    info = index_info(manifest, "v000003")
    assert info == {"index_version": "v000003", "model_name": "tiny", "model_fingerprint": "f00", "tokens": "all",
                    "n_samples": 7, "sketch_dim": 12, "index_kind": "flat-ip",
                    "manifest": {k: v for k, v in manifest.items() if k != "files"}}
    assert "files" in manifest  # not mutated
