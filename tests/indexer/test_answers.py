"""Answers users act on (issue 10): metadata filters, group-by, calibrated scores and deletions, each
against brute force (exact For-Value of every row, filtered / grouped / normalised by plain loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.data import Sample
from forvalue.indexer.deletion import DELETED_FILE, delete_samples, deleted_of, read_id_file
from forvalue.indexer.errors import ConfigError, DataError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.filters import FieldIndex, Where, value_key
from forvalue.indexer.forward import extract_features
from forvalue.indexer.index import Index
from forvalue.indexer.score import exact_scores, reference_G
from forvalue.indexer.store import IndexRoot

from serving import corpus as serving_corpus

SOURCES = ["gsm8k", "mmlu", "web"]
LICENSES = ["mit", "cc-by", "apache"]


def _meta(i, words):
    meta = {"source": SOURCES[i % 3 if i % 7 else 0], "license": LICENSES[(i // 2) % 3], "year": 2020 + i % 4}
    if i % 11 == 5:
        del meta["license"]  # some rows lack a field
    return meta


def corpus(n, seed=0, prefix="s"):
    return serving_corpus(n, seed, prefix, max_words=5, meta=_meta)


CFG = BuildConfig(tokens="response", sketch=SketchConfig(rank=8, buckets=64, fit_samples=50), shard_size=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("answers")
    samples = corpus(48)
    build_index(str(root), samples, lm, CFG)
    return root, samples


@pytest.fixture(scope="module")
def index(built, lm):
    return Index.open(str(built[0]), lm)


@pytest.fixture(scope="module")
def exact(lm, built):
    """Exact S (3 queries × 48 rows), float32 features as the index stores them."""
    _, samples = built
    cfg = ForwardConfig(tokens="response")
    head = Head.from_model(lm.model)
    queries = corpus(3, seed=9, prefix="q")
    fq = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in queries], cfg, head)
    ft = extract_features(lm.model, lm.tokenizer, [(s.prompt, s.response) for s in samples], cfg, head)
    return queries, exact_scores(fq, ft, head).double(), (fq, ft, head)


def matching(samples, where: Where):
    return [i for i, s in enumerate(samples) if where.matches({"id": s.id, "label": s.label, "meta": s.meta})]


def brute_topk(S_row, allowed, k, direction):
    vals = [(float(S_row[i]), i) for i in allowed]
    vals.sort(key=lambda t: (-t[0], t[1]) if direction == "most" else (t[0], t[1]))
    return [i for _, i in vals[:k]]


# ------------------------------------------------------------------------------------------- filters


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


# ------------------------------------------------------------------------------------------- group by


@pytest.mark.parametrize("direction", ["most", "least"])
def test_group_by_equals_brute_force(index, built, exact, direction):
    _, samples = built
    queries, S, _ = exact
    res = index.group_by([queries[0]], "license", k=2, direction=direction)
    assert res.scored == len(samples)
    by: dict = {}
    for i, s in enumerate(samples):
        by.setdefault(s.meta.get("license"), []).append(i)
    assert {g.key for g in res.groups} == set(by)
    totals = [g.total for g in res.groups]
    assert totals == sorted(totals, reverse=direction == "most")
    for g in res.groups:
        members = by[g.key]
        want_total = sum(float(S[0][i]) for i in members)
        assert g.count == len(members)
        assert g.total == pytest.approx(want_total, rel=1e-4, abs=1e-4)
        assert g.mean == pytest.approx(want_total / len(members), rel=1e-4, abs=1e-4)
        assert [h.id for h in g.hits] == [samples[i].id for i in brute_topk(S[0], members, 2, direction)]
    assert sum(g.total for g in res.groups) == pytest.approx(float(S[0].sum()), rel=1e-4, abs=1e-4)


def test_group_by_respects_where_and_max_groups(index, built, exact):
    _, samples = built
    queries, S, _ = exact
    where = Where.parse(["year=2020", "year=2021"])
    res = index.group_by(queries[:2], "source", k=1, where=where, max_groups=2)
    allowed = matching(samples, where)
    assert res.scored == len(allowed) and len(res.groups) == 2
    group_S = S[:2].mean(0)
    totals = {}
    for i in allowed:
        totals[samples[i].meta["source"]] = totals.get(samples[i].meta["source"], 0.0) + float(group_S[i])
    best = sorted(totals.items(), key=lambda t: -t[1])[:2]
    assert [g.key for g in res.groups] == [k for k, _ in best]
    assert [g.total for g in res.groups] == pytest.approx([v for _, v in best], rel=1e-4, abs=1e-4)
    with pytest.raises(ConfigError, match="group_by"):
        index.group_by([queries[0]], "prompt")


# ------------------------------------------------------------------------------------------- calibration


def test_cosine_is_exact_normalised_score(index, built, exact, lm):
    _, samples = built
    queries, S, (fq, ft, head) = exact
    G_q = reference_G(fq.select([0]), head).double()
    G_t = reference_G(ft, head).double()
    res = index.search([queries[0]], k=5, rerank=len(samples))
    for h in res.hits:
        i = h.row
        want = float((G_q.flatten() @ G_t[i].flatten()) / (G_q.norm() * G_t[i].norm()))
        assert h.cosine == pytest.approx(want, abs=1e-4)
    group = index.search(queries, k=3, rerank=len(samples))
    G_mean = reference_G(fq, head).double().mean(0)
    for h in group.hits:
        want = float((G_mean.flatten() @ G_t[h.row].flatten()) / (G_mean.norm() * G_t[h.row].norm()))
        assert h.cosine == pytest.approx(want, abs=1e-4)


def test_percentile_places_exact_scores_among_first_stage_scores(index, built, exact):
    _, samples = built
    queries, S, _ = exact
    for direction in ("most", "least"):
        res = index.search([queries[1]], k=len(samples), direction=direction, rerank=len(samples))
        fq = index.encode([queries[1]])
        ref = np.sort(index.sketch_scores(index.query_sketches(fq))[0].numpy().astype(np.float64))
        for h in res.hits:
            want = (np.sum(ref < h.score) + 0.5 * np.sum(ref == h.score)) / ref.size
            assert h.percentile == pytest.approx(want)
        pct = [h.percentile for h in res.hits]
        assert pct == sorted(pct, reverse=direction == "most")  # monotone in the exact score
        assert all(0.0 <= p <= 1.0 for p in pct)
    # against the exact percentile of every row: close on average (the estimate is the first stage's)
    exact_pct = [(np.sum(S[1].numpy() < float(S[1][h.row])) + 0.5) / len(samples) for h in res.hits]
    assert np.mean(np.abs(np.asarray(pct) - np.asarray(exact_pct))) < 0.25


def test_calibrate_false_and_old_index_without_norms(index, exact):
    res = index.search([exact[0][0]], k=2, calibrate=False)
    assert all(h.percentile is None and h.cosine is None for h in res.hits)
    index_no_norms = Index.__new__(Index)
    index_no_norms.__dict__.update(index.__dict__, g_norm=None)
    assert all(h.cosine is None and h.percentile is not None for h in index_no_norms.search([exact[0][0]], k=2).hits)


# ------------------------------------------------------------------------------------------- deletions


def test_read_id_file(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("# takedown 2026-11\ns1\n\n  s2  \n{\"id\": 7}\n")
    assert read_id_file(p) == ["s1", "s2", "7"]
    p.write_text("{\"name\": 1}\n")
    with pytest.raises(DataError, match=r"ids.txt, row 1: a JSON line needs an \"id\""):
        read_id_file(p)
    with pytest.raises(DataError, match="no ids"):
        (tmp_path / "empty.txt").write_text("\n# none\n")
        read_id_file(tmp_path / "empty.txt")


def test_delete_publishes_version_that_never_returns_them(tmp_path, lm, exact):
    queries, S, _ = exact
    samples = corpus(48)
    root = tmp_path / "idx"
    v1 = build_index(str(root), samples, lm, CFG)
    idx1 = Index.open(str(root), lm)
    top = idx1.search([queries[0]], k=5, rerank=48)
    gone = [top.hits[0].id, top.hits[2].id, "s40"]
    with pytest.raises(DataError, match="1 id\\(s\\) are in no row.*'nope'"):
        delete_samples(str(root), gone + ["nope"])
    assert IndexRoot(root).current() == v1  # refused whole: nothing written
    res = delete_samples(str(root), gone)
    assert res.published and res.base == v1 and res.deleted == sorted(gone) and res.hidden_rows == 3
    assert IndexRoot(root).current() == res.version
    idx2 = Index.open(str(root), lm)
    gone_rows = {int(s.id[1:]) for s in samples if s.id in gone}
    assert deleted_of(idx2.version).rows.tolist() == sorted(gone_rows)
    for direction in ("most", "least"):
        got = idx2.search([queries[0]], k=6, direction=direction, rerank=48)
        want = brute_topk(S[0], [i for i in range(48) if i not in gone_rows], 6, direction)
        assert [h.id for h in got.hits] == [samples[i].id for i in want]
    got = idx2.search([queries[0]], k=48, rerank=10)
    assert not {h.id for h in got.hits} & set(gone) and len(got.hits) == 45
    assert not {h.id for g in idx2.group_by([queries[0]], "source", k=48).groups for h in g.hits} & set(gone)
    assert sum(g.count for g in idx2.group_by([queries[0]], "source").groups) == 45
    # the old version is untouched and still answers with them
    assert top.hits[0].id in {h.id for h in Index.open(str(root), lm, version=v1).search([queries[0]], k=5).hits}
    # deleting again: nothing new, no new version
    again = delete_samples(str(root), gone[:1])
    assert not again.published and again.already == gone[:1]
    # unknown ids may be recorded with missing="ignore"; they are reported
    res3 = delete_samples(str(root), ["later-id"], missing="ignore")
    assert res3.unknown == ["later-id"] and res3.published
    # a rebuild drops them physically and keeps the takedown record; adding them back is refused silently
    v4 = build_index(str(root), samples + [Sample(id="later-id", prompt="Upper: sky ->", response=" SKY")], lm, CFG)
    with IndexRoot(root).load(v4) as v:
        ids = [r["id"] for r in v.rows(np.arange(v.n))]
        assert v.n == 45 and not set(ids) & (set(gone) | {"later-id"})
        assert deleted_of(v).ids == frozenset(gone + ["later-id"]) and deleted_of(v).rows.size == 0
    idx4 = Index.open(str(root), lm)
    assert [h.id for h in idx4.search([queries[0]], k=6, rerank=45).hits] == \
        [samples[i].id for i in brute_topk(S[0], [i for i in range(48) if i not in gone_rows], 6, "most")]


def test_add_to_an_index_with_deletions_keeps_them_hidden(tmp_path, lm, exact):
    from forvalue.indexer.store import IndexRoot as Root

    queries, S, _ = exact
    samples = corpus(48)
    root = tmp_path / "idx"
    build_index(str(root), samples[:32], lm, CFG)
    delete_samples(str(root), ["s3", "s4"])
    base = Root(root).load()
    extra = samples[32:] + [Sample(id="s3", prompt="Upper: sky ->", response=" SKY")]
    build_index(str(root), extra, lm, CFG, base=base)
    idx = Index.open(str(root), lm)
    assert idx.n == 48 and deleted_of(idx.version).rows.tolist() == [3, 4]
    assert DELETED_FILE in idx.version.manifest["files"]
    got = idx.search([queries[0]], k=10, rerank=48)
    want = brute_topk(S[0], [i for i in range(48) if i not in (3, 4)], 10, "most")
    assert [h.id for h in got.hits] == [samples[i].id for i in want]


def test_percentile_on_large_indexes_uses_a_fixed_sample(built, lm, exact):
    root, samples = built
    idx = Index.open(str(root), lm)
    assert idx.manifest["calibration"] == {"rows": 8192, "seed": CFG.sketch.seed}  # recorded by the build
    idx.manifest["calibration"] = {"rows": 20, "seed": 3}  # as an index of more than 20 rows would have it
    queries, S, _ = exact
    res = idx.search([queries[2]], k=10, rerank=len(samples))
    assert idx._calibration.shape[0] == 20
    rows = np.sort(np.random.default_rng(3).choice(np.arange(len(samples)), 20, replace=False))
    fq = idx.encode([queries[2]])
    ref = np.sort(idx.sketch_scores(idx.query_sketches(fq))[0].numpy()[rows].astype(np.float64))
    for h in res.hits:
        assert h.percentile == pytest.approx((np.sum(ref < h.score) + 0.5 * np.sum(ref == h.score)) / 20)
