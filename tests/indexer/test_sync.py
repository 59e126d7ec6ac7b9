"""`index sync` (indexer/sync.py): equal to a fresh build with the same maps, no forward pass for unchanged rows,
resumable, safe against a concurrent add; the plan and the row merge against simple references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from forvalue.indexer import sync as sync_mod
from forvalue.indexer.build import build_index
from forvalue.indexer.config import SyncConfig
from forvalue.indexer.data import Sample
from forvalue.indexer.errors import IndexChangedError
from forvalue.indexer.index import Index
from forvalue.indexer.sketch import MAP_FILES, Sketcher
from forvalue.indexer.store import IndexRoot
from forvalue.indexer.sync import merge_rows, plan_sync, sync_index

from indexes import CFG, plain_corpus


def edited_corpus(old: list[Sample]) -> list[Sample]:
    """`old` with rows removed (5..9), edited (20: response, 33: prompt), a metadata-only change (40), and rows
    added in the middle and at the end."""
    new = [s for i, s in enumerate(old) if not 5 <= i < 10]
    new = [dataclasses.replace(s, response=s.response + " again") if s.id == "s20" else s for s in new]
    new = [dataclasses.replace(s, prompt=s.prompt + "?") if s.id == "s33" else s for s in new]
    new = [dataclasses.replace(s, meta={**s.meta, "source": "c"}) if s.id == "s40" else s for s in new]
    added = [dataclasses.replace(s, id=f"n{i}") for i, s in enumerate(plain_corpus(6, seed=5))]
    return new[:25] + added[:3] + new[25:] + added[3:]


@pytest.fixture()
def synced(tmp_path, lm):
    """(root, new corpus, SyncResult) of a 60-row index synced to `edited_corpus`."""
    root = str(tmp_path / "idx")
    old = plain_corpus(60)
    build_index(root, old, lm, CFG)
    new = edited_corpus(old)
    return root, new, sync_index(root, new, lm, batch_tokens=4096)


def maps_of(root: str) -> Sketcher:
    with IndexRoot(root).load() as v:
        return Sketcher.from_arrays({n: np.array(v.global_array(n)) for n in MAP_FILES}, v.manifest["sketch"]["buckets"])


def test_sync_equals_a_fresh_build_with_the_same_maps(synced, tmp_path, lm):
    root, new, r = synced
    assert (r.before, r.after, r.rows) == ("v000001", "v000002", len(new))
    assert (r.encoded, r.dropped, r.metadata_updated) == (2 + 6, 5, 1)  # 2 edited + 6 added; 5 removed
    assert r.reused == len(new) - r.encoded and r.linked_shards >= 1
    ref_root = str(tmp_path / "ref")
    build_index(ref_root, new, lm, CFG, maps=maps_of(root))
    a, b = IndexRoot(root).load(), IndexRoot(ref_root).load()
    assert a.n == b.n == len(new)
    assert a.rows(np.arange(a.n)) == b.rows(np.arange(b.n))  # same ids, order and metadata
    for name in ("sketch", "g_norm"):
        np.testing.assert_allclose(a.array(name), b.array(name), rtol=1e-4, atol=1e-5)
    ta, tb = a.token_rows(np.arange(a.n)), b.token_rows(np.arange(b.n))
    np.testing.assert_array_equal(ta["offsets"], tb["offsets"])
    np.testing.assert_array_equal(ta["y"], tb["y"])
    np.testing.assert_allclose(ta["h"], tb["h"], rtol=1e-4, atol=1e-5)
    ia, ib = Index.open(root, lm), Index.open(ref_root, lm)
    for q in (new[0], new[26], plain_corpus(3, seed=11)[2]):
        for direction in ("most", "least"):
            ra, rb = ia.search([q], k=8, direction=direction, rerank=20), ib.search([q], k=8, direction=direction,
                                                                                   rerank=20)
            assert [h.id for h in ra.hits] == [h.id for h in rb.hits]
            np.testing.assert_allclose([h.score for h in ra.hits], [h.score for h in rb.hits], rtol=1e-4, atol=1e-6)
        qs = ia.query_sketches(ia.encode([q])).numpy()
        assert set(ia.ann.search(qs, 20, "most")[1][0]) == set(ib.ann.search(qs, 20, "most")[1][0])


def test_an_unchanged_corpus_encodes_nothing_and_publishes_nothing(synced, lm, monkeypatch):
    root, new, _ = synced
    calls = []
    monkeypatch.setattr(sync_mod, "encode_shard", lambda *a, **kw: calls.append(a) or pytest.fail("encoded"))
    r = sync_index(root, new, lm, batch_tokens=4096)
    assert not r.published and r.after == "v000002" and (r.reused, r.encoded, r.dropped) == (len(new), 0, 0)
    assert IndexRoot(root).versions() == ["v000001", "v000002"]
    # metadata alone changed: a new version, still no forward pass
    meta = [dataclasses.replace(s, meta={"source": "z"}) if i == 3 else s for i, s in enumerate(new)]
    r = sync_index(root, meta, lm, batch_tokens=4096)
    assert r.published and (r.encoded, r.metadata_updated) == (0, 1) and not calls
    with IndexRoot(root).load() as v:
        assert v.rows([3])[0]["meta"] == {"source": "z"}


def test_a_killed_sync_resumes_with_its_finished_shards(tmp_path, lm, monkeypatch):
    root = str(tmp_path / "idx")
    old = plain_corpus(60)
    build_index(root, old, lm, CFG)
    new = [dataclasses.replace(s, response=s.response + " x") if i % 9 == 0 else s for i, s in enumerate(old)]
    real = sync_mod.encode_shard
    calls = []

    def dying(*a, **kw):
        calls.append(len(a[3]))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(sync_mod, "encode_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        sync_index(root, new, lm, batch_tokens=4096)
    assert IndexRoot(root).current() == "v000001"
    calls.clear()
    monkeypatch.setattr(sync_mod, "encode_shard", lambda *a, **kw: calls.append(len(a[3])) or real(*a, **kw))
    r = sync_index(root, new, lm, batch_tokens=4096)
    assert r.resumed_shards == 2 and len(calls) == 2 and r.encoded_now < r.encoded == 7
    ref_root = str(tmp_path / "ref")
    build_index(ref_root, new, lm, CFG, maps=maps_of(root))
    a, b = IndexRoot(root).load(), IndexRoot(ref_root).load()
    assert a.rows(np.arange(a.n)) == b.rows(np.arange(b.n))
    np.testing.assert_allclose(a.array("sketch"), b.array("sketch"), rtol=1e-4, atol=1e-5)


def test_a_sync_racing_an_add_loses_nothing(tmp_path, lm, monkeypatch):
    root = str(tmp_path / "idx")
    old = plain_corpus(40)
    build_index(root, old, lm, CFG)
    first, second = ([dataclasses.replace(s, id=f"{p}{i}") for i, s in enumerate(plain_corpus(5, seed=8))]
                     for p in ("a", "b"))
    new = [dataclasses.replace(s, response=s.response + " y") if s.id == "s2" else s for s in old] + first + second
    real = sync_mod.encode_shard
    landed = []
    adds = [first, second]

    def an_add_lands_meanwhile(*a, **kw):
        if len(landed) < len(adds) and len(landed) < an_add_lands_meanwhile.rounds:
            landed.append(build_index(root, adds[len(landed)], lm, CFG, base=IndexRoot(root).load()))
        return real(*a, **kw)

    an_add_lands_meanwhile.rounds = 1
    monkeypatch.setattr(sync_mod, "encode_shard", an_add_lands_meanwhile)
    with pytest.raises(IndexChangedError, match="moved to v000002"):
        sync_index(root, new, lm, SyncConfig(retries=0), batch_tokens=4096)
    with IndexRoot(root).load() as v:  # nothing published over the add: its rows are all there
        assert v.name == landed[0] and [r["id"] for r in v.rows(np.arange(v.n))] == [s.id for s in old + first]
    an_add_lands_meanwhile.rounds = 2
    r = sync_index(root, new, lm, batch_tokens=4096)  # raced by the second add, started again from its version
    assert r.retries == 1 and r.before == landed[1] == "v000003" and r.after == "v000004"
    with IndexRoot(root).load() as v:
        assert [row["id"] for row in v.rows(np.arange(v.n))] == [s.id for s in new]
    assert (r.reused, r.encoded) == (len(new) - 1, 1)  # the added rows came from the adds: no second pass


def test_plan_links_whole_unchanged_shards_and_cuts_the_rest():
    rows = [{"id": f"r{i}", "prompt": "", "response": f"t{i}"} for i in range(10)]
    starts = np.array([0, 4, 8, 10])
    new = rows[:4] + [{"id": "x", "prompt": "", "response": "new"}] + rows[5:8] + rows[8:]
    new[5] = {**new[5], "meta": {"k": 1}}  # metadata of r5 changed
    plan = plan_sync(rows, starts, new, ("s", "s"), shard_size=3)
    assert [(s.positions.tolist(), s.link) for s in plan.shards] == [
        ([0, 1, 2, 3], 0), ([4, 5, 6], None), ([7], None), ([8, 9], 2)]
    assert plan.src.tolist() == [0, 1, 2, 3, -1, 5, 6, 7, 8, 9]
    assert (plan.dropped, plan.metadata_updated, plan.encoded) == (1, 1, 1)
    assert not plan.unchanged(3) and plan_sync(rows, starts, rows, ("s", "s"), 3).unchanged(3)
    # other scoring settings (e.g. a forward dtype): every row is encoded again
    assert plan_sync(rows, starts, rows, ("s", "t"), 3).encoded == 10


def test_merge_rows_against_a_per_row_reference():
    g = torch.Generator().manual_seed(0)
    lens = [[2, 0, 3], [1, 4]]
    parts, ref = [], {}
    for j, (pos, ls) in enumerate(zip(([4, 0, 2], [1, 3]), lens)):
        off = np.concatenate([[0], np.cumsum(ls)]).astype(np.int64)
        h = torch.randn(int(off[-1]), 3, generator=g).numpy()
        sk = torch.randn(len(ls), 2, generator=g).numpy()
        parts.append((np.array(pos), {"sketch": sk}, {"h": h}, off))
        for i, p in enumerate(pos):
            ref[p] = (sk[i], h[off[i] : off[i + 1]])
    arrays, tokens, offsets = merge_rows(parts, {"sketch": "<f4", "h": "<f2"})
    assert tokens["h"].dtype == np.float16
    for p in range(5):
        np.testing.assert_array_equal(arrays["sketch"][p], ref[p][0])
        np.testing.assert_array_equal(tokens["h"][offsets[p] : offsets[p + 1]], ref[p][1].astype(np.float16))


def test_refit_rebuilds_with_new_maps(synced, lm):
    root, new, _ = synced
    before = maps_of(root).projection
    r = sync_index(root, new[:40], lm, SyncConfig(refit=True), batch_tokens=4096)
    assert r.refit and r.published and r.encoded == 40 and r.reused == 0
    assert not torch.equal(maps_of(root).projection, before)


def _write(path, samples):
    import json

    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    return str(path)


def test_cli_summary_json_metrics_and_bad_input(tmp_path, served_lm, served_model_dir):
    import json

    from click.testing import CliRunner

    from forvalue.client.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["index", "sync", *args], catch_exceptions=False)

    root = str(tmp_path / "idx")
    old = plain_corpus(24)
    build_index(root, old, served_lm, CFG)
    data = _write(tmp_path / "new.jsonl", old[:20] + [dataclasses.replace(old[21], response="changed text")])
    prom = tmp_path / "sync.prom"
    common = ["--index", root, "--model", served_model_dir, "--no-progress", "--metrics-file", str(prom)]
    r = run("--data", data, "--json", *common)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["before"], rep["after"], rep["reused"], rep["encoded"], rep["dropped"]) == (
        "v000001", "v000002", 20, 1, 3)
    assert set(rep) >= {"seconds", "recall", "refit_advised", "reasons", "changed_share", "metadata_updated"}
    text = prom.read_text()
    assert 'forvalue_index_job_success{job="sync",index="%s"} 1.0' % root in text
    assert 'forvalue_index_job_rows{job="sync",index="%s",kind="encoded"} 1.0' % root in text
    r = run("--data", data, *common, "--max-changed", "0.01")  # the summary line; 1 of 21 rows encoded: > 1%
    assert r.exit_code == 0 and r.stdout.count("\n") == 1
    assert "sync v000002: unchanged, nothing published" in r.stdout and "refit advised" in r.stdout
    bad = _write(tmp_path / "dup.jsonl", old[:3] + old[:1])
    r = run("--data", bad, *common)
    assert r.exit_code == 2 and "duplicate id 's0'" in r.stderr and r.stderr.count("\n") == 1
    assert "forvalue_index_job_failures_total" in prom.read_text() and ' 1.0\n' in prom.read_text()
    assert 'forvalue_index_job_success{job="sync",index="%s"} 0.0' % root in prom.read_text()
    assert "forvalue_index_job_last_success_timestamp_seconds" in prom.read_text()
    r = run("--index", str(tmp_path / "none"), "--data", data, "--model", served_model_dir)
    assert r.exit_code == 2 and "no published index" in r.stderr


def test_metrics_file_carries_failures_and_last_success(tmp_path):
    from forvalue.indexer.jobmetrics import _previous, write_job_metrics

    p = tmp_path / "m.prom"
    write_job_metrics(p, "build", "/i", True, 1.5, {"total": 10})
    ok_at = _previous(p, "job_last_success_timestamp_seconds")
    write_job_metrics(p, "build", "/i", False, 0.2)
    write_job_metrics(p, "build", "/i", False, 0.2)
    assert _previous(p, "job_failures_total") == 2 and _previous(p, "job_success") == 0
    assert _previous(p, "job_last_success_timestamp_seconds") == ok_at > 0
    lines = [ln for ln in p.read_text().splitlines() if not ln.startswith("#")]
    assert all(len(ln.rsplit(" ", 1)) == 2 and float(ln.rsplit(" ", 1)[1]) >= 0 for ln in lines)


def test_a_sync_killed_by_sigkill_resumes(tmp_path, served_lm, served_model_dir):
    """`forvalue index sync` killed (kill -9, FORVALUE_FAULT at the second shard's _DONE.json) publishes nothing;
    the same command then resumes from the finished shard and publishes the corpus."""
    import json
    import os
    import subprocess
    import sys

    root = str(tmp_path / "idx")
    old = plain_corpus(40)
    build_index(root, old, served_lm, CFG)
    new = [dataclasses.replace(s, response=s.response + " z") if i % 8 == 0 else s for i, s in enumerate(old)]
    data = _write(tmp_path / "new.jsonl", new)
    cmd = [sys.executable, "-m", "forvalue.client.cli", "index", "sync", "--index", root, "--data", data, "--model",
           served_model_dir, "--no-progress", "--json"]
    env = {**os.environ, "FORVALUE_FAULT": "shard-done:2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert IndexRoot(root).current() == "v000001"
    env.pop("FORVALUE_FAULT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rep = json.loads(done.stdout)
    assert rep["after"] == "v000002" and rep["resumed_shards"] == 1 and rep["encoded_now"] < rep["encoded"] == 5
    with IndexRoot(root).load() as v:
        assert [r["response"] for r in v.rows(np.arange(v.n))] == [s.response for s in new]


def test_build_and_add_write_the_metrics_file(tmp_path, served_model_dir):
    from click.testing import CliRunner

    from forvalue.client.cli import main

    prom = tmp_path / "build.prom"
    data = _write(tmp_path / "c.jsonl", plain_corpus(12))
    root = str(tmp_path / "idx")
    r = CliRunner().invoke(main, ["index", "build", "--data", data, "--index", root, "--model", served_model_dir,
                                  "--no-progress", "--dim", "64", "--rank", "2", "--shard-size", "8",
                                  "--metrics-file", str(prom)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert 'forvalue_index_job_rows{job="build",index="%s",kind="total"} 12.0' % root in prom.read_text()
    more = _write(tmp_path / "m.jsonl", [dataclasses.replace(s, id=f"m{i}") for i, s in enumerate(plain_corpus(3))])
    r = CliRunner().invoke(main, ["index", "add", "--index", root, "--data", more, "--model", served_model_dir,
                                  "--no-progress", "--metrics-file", str(prom)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert 'forvalue_index_job_rows{job="add",index="%s",kind="total"} 15.0' % root in prom.read_text()
    changed = _write(tmp_path / "m2.jsonl", [dataclasses.replace(s, id=f"m{i}", response=s.response + " x")
                                             for i, s in enumerate(plain_corpus(3))])
    r = CliRunner().invoke(main, ["index", "add", "--index", root, "--data", changed, "--model", served_model_dir,
                                  "--no-progress", "--metrics-file", str(prom)], catch_exceptions=False)
    assert r.exit_code == 2 and 'forvalue_index_job_success{job="add",index="%s"} 0.0' % root in prom.read_text()


def test_content_key_covers_what_is_scored_and_nothing_else():
    from forvalue.indexer.sync import content_key, scoring_settings

    m = {"model": {"fingerprint": "f", "tokenizer_fingerprint": "t"}, "tokens": "response", "max_length": 64}
    plain = scoring_settings(m)
    row = {"id": "a", "prompt": "p", "response": "r", "meta": {"x": 1}}
    key = content_key(row, plain)
    assert content_key({**row, "id": "b", "meta": {"x": 2}, "label": "l"}, plain) == key  # metadata: not scored
    assert content_key({**row, "response": "r2"}, plain) != key
    assert content_key({**row, "prompt": "p", "response": "", "chat": None}, plain) != key
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "scored": [1]}
    assert content_key({**row, "chat": chat}, plain) != key
    # a conversation's prompt and response only name it for people: shown otherwise, scored the same
    assert content_key({**row, "chat": chat, "prompt": "shown otherwise"}, plain) == content_key({**row, "chat": chat},
                                                                                                plain)
    assert content_key({**row, "image_sha256": "0" * 64}, plain) != key
    assert content_key(row, scoring_settings({**m, "data": {"template": "chat"}})) != key
    assert content_key(row, scoring_settings({**m, "forward_dtype": "bfloat16"})) != key
    assert scoring_settings({**m, "data": {"template": "plain", "fields": {"prompt": "q"}}}) == plain
