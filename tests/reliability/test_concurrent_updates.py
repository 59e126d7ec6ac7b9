"""Concurrent updates of one index never lose rows: publishing is a compare-and-swap of CURRENT against the
version an update started from (IndexRoot.publish); a stale update is refused with a clear message (CLI: exit 2)
and publishes nothing; gc never deletes a version newer than CURRENT.

Before: two `index add` runs at once both exited 0, v2 = v1 + A, v3 = v1 + B became CURRENT, A's rows were
gone from it, and `index gc --keep 1` deleted them for good; a rebuild racing an add reverted the add.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.errors import IndexChangedError
from forvalue.indexer.store import IndexRoot

from serving import corpus

CFG = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=24), shard_size=8)


def ids_of(root) -> set[str]:
    with IndexRoot(root).load() as v:
        return {str(r["id"]) for r in v.rows(range(v.n))}


def test_a_stale_add_is_refused_and_the_rerun_keeps_both(tmp_path, served_lm):
    root = tmp_path / "idx"
    build_index(str(root), corpus(24), served_lm, CFG)
    base = IndexRoot(root).load()  # both adds start from v1
    a, b = corpus(8, seed=1, prefix="a"), corpus(8, seed=2, prefix="b")
    build_index(str(root), a, served_lm, CFG, base=base)
    with pytest.raises(IndexChangedError, match="moved to v000002"):
        build_index(str(root), b, served_lm, CFG, base=base)
    assert IndexRoot(root).current() == "v000002" and ids_of(root) >= {s.id for s in a}
    build_index(str(root), b, served_lm, CFG, base=IndexRoot(root).load())  # rerun from the new CURRENT
    assert ids_of(root) == {s.id for s in corpus(24) + a + b}
    IndexRoot(root).gc(1)
    assert ids_of(root) == {s.id for s in corpus(24) + a + b}


def test_a_rebuild_that_an_add_overtook_does_not_revert_it(tmp_path, served_lm):
    root = tmp_path / "idx"
    build_index(str(root), corpus(24), served_lm, CFG)
    added = corpus(8, seed=3, prefix="x")

    def an_add_publishes_meanwhile(build, todo, norms):  # called while the rebuild writes its shards
        build_index(str(root), added, served_lm, CFG, base=IndexRoot(root).load())

    with pytest.raises(IndexChangedError):
        build_index(str(root), corpus(24, seed=9, prefix="r"), served_lm, CFG, write_shards=an_add_publishes_meanwhile)
    assert ids_of(root) == {s.id for s in corpus(24) + added}


def test_gc_keeps_versions_newer_than_current(tmp_path, served_lm):
    root = tmp_path / "idx"
    for i in range(3):
        build_index(str(root), corpus(12, seed=i, prefix=f"v{i}-"), served_lm, CFG)
    r = IndexRoot(root)
    r.set_current("v000001")  # a roll-back
    assert r.gc(1) == [] and r.versions() == ["v000001", "v000002", "v000003"]


def test_two_cli_adds_at_once_lose_no_rows(tmp_path, served_lm, served_model_dir):
    """Two `forvalue index add` processes started together, three times: every add that exited 0 has all its
    rows in CURRENT; one that lost the race exited 2 with one line saying so."""
    root = tmp_path / "idx"
    build_index(str(root), corpus(24), served_lm, CFG)
    want = {s.id for s in corpus(24)}
    for round_ in range(3):
        procs, rows = [], {}
        for who in "ab":
            data = tmp_path / f"{who}{round_}.jsonl"
            samples = corpus(6, seed=10 * round_ + ord(who), prefix=f"{who}{round_}-")
            data.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
            rows[who] = {s.id for s in samples}
            procs.append((who, subprocess.Popen(
                [sys.executable, "-m", "forvalue.client.cli", "index", "add", "--index", str(root), "--data",
                 str(data), "--model", served_model_dir, "--no-progress"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for who, p in procs:
            out, err = p.communicate(timeout=300)
            if p.returncode == 0:
                want |= rows[who]
            else:
                assert p.returncode == 2 and "moved to" in err and len(err.strip().splitlines()) == 1, err
        assert ids_of(root) >= want, f"round {round_}: rows of a successful add are missing from CURRENT"
    IndexRoot(root).gc(1)
    assert ids_of(root) >= want
