"""Metadata filters (indexer/filters.py): Where, FieldIndex and filtered top-k, against brute force (exact
For-Value of every row, filtered by a plain loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.filters import FieldIndex, Where, value_key

from indexes import brute_topk, matching


def test_where_parse_and_match():
    w = Where.parse(["source=gsm8k", "source=mmlu", "year=2021", "note=a=b"])
    assert w.as_dict() == {"note": ["a=b"], "source": ["gsm8k", "mmlu"], "year": ["2021"]}
    row = {"id": "x", "meta": {"source": "mmlu", "year": 2021, "note": "a=b"}}
    assert w.matches(row)
    assert not w.matches({**row, "meta": {**row["meta"], "year": 2022}})
    assert not w.matches({"id": "x", "meta": {"source": "mmlu", "note": "a=b"}})  # missing field
    assert value_key(2021.0) == value_key(2021) == "2021" and value_key(True) == "true"
    assert Where.of([("clean", True)]).matches({"clean": True}) and Where.parse(["clean=true"]).matches({"clean": True})
    for bad in (["source"], ["=x"]):
        with pytest.raises(ConfigError, match="FIELD=VALUE"):
            Where.parse(bad)
    for field in ("prompt", "response", "meta", ""):
        with pytest.raises(ConfigError):
            Where.of([(field, "x")])


def test_field_index_rows_equal_per_row_reference(built):
    _, samples = built
    rows = [{"id": s.id, "label": s.label, "meta": s.meta} for s in samples]
    fi = FieldIndex(lambda idx: [rows[i] for i in idx], len(rows))
    for w in (Where.parse(["source=web"]), Where.parse(["license=mit", "license=apache", "source=gsm8k"]),
              Where.parse(["year=2021", "label=Upper"]), Where.parse(["source=none"])):
        assert fi.rows(w).tolist() == [i for i, r in enumerate(rows) if w.matches(r)]
    with pytest.raises(ConfigError, match="no training sample of this index has a field 'sourse'"):
        fi.rows(Where.parse(["sourse=web"]))


@pytest.mark.parametrize("direction", ["most", "least"])
@pytest.mark.parametrize("items", [["source=web"], ["license=mit", "license=cc-by"], ["source=mmlu", "year=2021"]])
def test_filtered_topk_equals_topk_of_filtered_set(index, built, exact, direction, items):
    _, samples = built
    queries, S, _ = exact
    where = Where.parse(items)
    allowed = matching(samples, where)
    assert 0 < len(allowed) < len(samples)
    for j, q in enumerate(queries):
        res = index.search([q], k=4, direction=direction, rerank=len(samples), where=where)
        want = brute_topk(S[j], allowed, 4, direction)
        assert [h.id for h in res.hits] == [samples[i].id for i in want]
        np.testing.assert_allclose([h.score for h in res.hits], [float(S[j][i]) for i in want], rtol=1e-4, atol=1e-5)
        assert res.candidates == len(allowed)


@pytest.mark.parametrize("direction", ["most", "least"])
def test_filtered_first_stage_is_the_unfiltered_pipeline_on_the_subset(index, built, exact, direction):
    """With few candidates (rerank < |subset|): the first stage ranks only the subset's sketches."""
    _, samples = built
    queries, S, _ = exact
    where = Where.parse(["source=gsm8k", "source=web"])
    allowed = np.asarray(matching(samples, where))
    for j, q in enumerate(queries):
        fq = index.encode([q])
        qs = index.query_sketches(fq).mean(0).numpy()
        sk = index.sketch_scores(torch.from_numpy(qs[None]))[0].numpy()[allowed]
        key = -sk if direction == "most" else sk
        cand = allowed[np.argsort(key, kind="stable")[:8]]
        want = brute_topk(S[j], cand.tolist(), 3, direction)
        res = index.search([q], k=3, direction=direction, rerank=8, where=where)
        assert [h.id for h in res.hits] == [samples[i].id for i in want]
        assert res.candidates == 8


def test_filter_matching_nothing_is_an_empty_answer(index, exact):
    res = index.search([exact[0][0]], k=3, where=Where.parse(["source=nowhere"]))
    assert res.hits == [] and res.candidates == 0
