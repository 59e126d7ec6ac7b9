"""`forvalue index gc --keep N`: old versions go, CURRENT and the N newest stay, and a server still serving a
removed version goes on answering from it (POSIX unlink semantics) until it moves to CURRENT."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.client.client import InfluenceClient
from forvalue.indexer.build import build_index
from forvalue.indexer.config import BuildConfig, SketchConfig
from forvalue.indexer.store import IndexRoot
from forvalue.server.config import ServerConfig

from serving import ServerThread, corpus

QUERIES = [(s.prompt, s.response) for s in corpus(4, seed=29, prefix="q")]
CONFIG = BuildConfig(tokens="response", sketch=SketchConfig(rank=4, buckets=32, fit_samples=20), shard_size=8)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def ask(client: InfluenceClient) -> list:
    """TopK (most and least, group and per sample) and ScoreAll answers: versions, ids, rows, scores."""
    out = []
    for group in (True, False):
        out += [(q, r.version, r.direction, [(h.id, h.row, h.score, h.metadata) for h in r.hits])
                for q, r in client.top_k(QUERIES, k=10, direction="both", rerank=20, group=group)]
    ids, scores, version = client.score_all(QUERIES, return_version=True)
    return out + [(version, ids, scores.tolist())]


def test_gc_removes_a_version_a_server_still_serves(tmp_path, served_index, served_model_dir, served_lm,
                                                    influence_server):
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    idx = IndexRoot(root)
    v1 = idx.current()
    srv = ServerThread(ServerConfig(index_dir=str(root), model_path=served_model_dir, k_cap=20, watch_seconds=0))
    try:
        srv.wait_ready()
        with InfluenceClient(srv.address, timeout=60) as client, \
                InfluenceClient(influence_server.address, timeout=60) as reference:
            client.search(QUERIES[:1], k=3)  # served before the swap
            v2 = build_index(str(root), corpus(20, seed=23, prefix="g"), served_lm, CONFIG)
            v3 = build_index(str(root), corpus(20, seed=31, prefix="h"), served_lm, CONFIG)
            idx.set_current(v2)  # CURRENT is not the newest: gc keeps both
            r = run("index", "gc", "--index", str(root), "--keep", "1")
            assert r.exit_code == 0, r.output
            assert json.loads(r.stdout) == {"removed": [v1], "kept": [v2, v3], "current": v2}
            assert not idx.version_dir(v1).exists() and idx.versions() == [v2, v3]

            # the server still serves v1, from files that are gone from the directory
            assert srv.server.servicer.version == v1
            expected = ask(reference)  # the session's server: the same v1, never collected
            assert expected[0][1] == v1
            assert ask(client) == expected

            # new loads work: the server moves to CURRENT, gc leaves CURRENT alone even with --keep 1
            assert srv.run(srv.server.reload()) == v2
            after = ask(client)
            assert {a[1] for a in after[:-1]} == {v2} and after[-1][0] == v2
            assert {h[0][0] for a in after[:-1] for h in a[3]} == {"g"}
            idx.load(verify=True).close()
            r = run("index", "gc", "--index", str(root), "--keep", "1")
            assert r.exit_code == 0 and json.loads(r.stdout)["removed"] == [], r.output
            idx.set_current(v3)
            r = run("index", "gc", "--index", str(root), "--keep", "1")
            assert json.loads(r.stdout) == {"removed": [v2], "kept": [v3], "current": v3}
            assert srv.server.servicer.version == v2 and ask(client) == after  # v2 gone, still answering
            assert srv.run(srv.server.reload()) == v3
    finally:
        srv.stop()


def test_gc_refuses_bad_arguments_and_missing_or_broken_indexes(tmp_path, served_index):
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    for keep in ("0", "-1"):
        r = run("index", "gc", "--index", str(root), "--keep", keep)
        assert r.exit_code == 2 and "--keep must be at least 1" in r.stderr, r.output
    r = run("index", "gc", "--index", str(root))
    assert r.exit_code == 2 and "--keep" in r.output
    missing = tmp_path / "nothing"
    r = run("index", "gc", "--index", str(missing), "--keep", "1")
    assert r.exit_code == 2 and "no such index directory" in r.stderr and not missing.exists()
    (tmp_path / "plain").mkdir()
    r = run("index", "gc", "--index", str(tmp_path / "plain"), "--keep", "1")
    assert r.exit_code == 2 and "not an index directory" in r.stderr
    assert not (tmp_path / "plain" / ".lock").exists()

    # a CURRENT that cannot be read: nothing is deleted
    shutil.copytree(root / "versions" / "v000001", root / "versions" / "v000002")
    (root / "CURRENT").write_text("../../etc\n")
    r = run("index", "gc", "--index", str(root), "--keep", "1")
    assert r.exit_code == 2 and "CURRENT" in r.stderr
    assert IndexRoot(root).versions() == ["v000001", "v000002"]
