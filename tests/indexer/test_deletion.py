"""Deletions (indexer/deletion.py): id files, published versions that never return deleted rows, and builds
on top of an index with deletions, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from forvalue.indexer.build import build_index
from forvalue.indexer.data import Sample
from forvalue.indexer.deletion import DELETED_FILE, delete_samples, deleted_of, read_id_file
from forvalue.indexer.errors import DataError
from forvalue.indexer.index import Index
from forvalue.indexer.store import IndexRoot

from indexes import CFG, brute_topk, meta_corpus as corpus


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
