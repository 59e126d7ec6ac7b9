"""Counts agree everywhere: first-stage ntotal = manifest n_samples = metadata rows = sum of shard sizes, no
duplicate ids, and every id a server returns (TopK, ScoreAll) is a stored row; the same after `index add`."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.client.client import InfluenceClient
from forvalue.indexer.data import write_jsonl
from forvalue.indexer.index import Index
from forvalue.indexer.store import IndexRoot
from forvalue.server.config import ServerConfig

from serving import ServerThread, corpus

QUERIES = [(s.prompt, s.response) for s in corpus(4, seed=17, prefix="q")]


def check_counts(root, version: str, lm) -> list[dict]:
    """Every count of `version` agrees; returns its stored rows in row order."""
    index = Index.open(str(root), lm, version=version)
    v, m = index.version, index.version.manifest
    n = m["n_samples"]
    metadata_lines = [len((v.path / "shards" / f"{s:06d}" / "metadata.jsonl").read_bytes().splitlines())
                      for s in range(v.n_shards)]
    sketch_rows = [a.shape[0] for a in v.shard_arrays("sketch")]
    assert index.ann.ntotal == m["index"]["ntotal"] == n == v.n == m["n_rows"] == index.n
    assert m["shard_sizes"] == v.shard_rows.tolist() == metadata_lines == sketch_rows
    assert sum(m["shard_sizes"]) == n
    assert v.offsets().shape == (n + 1,) and v.offsets()[-1] == v.array("h").shape[0]
    rows = v.rows(np.arange(n))
    ids = [r["id"] for r in rows]
    assert len(ids) == n and not [i for i, c in Counter(ids).items() if c > 1]
    return rows


def check_answers(client: InfluenceClient, rows: list[dict], version: str) -> int:
    """Every id TopK and ScoreAll return is the stored row it claims to be; returns the calls made."""
    calls = 0
    for group in (True, False):
        answers = client.top_k(QUERIES, k=20, direction="both", rerank=50 if group else 20, group=group)
        calls += 1
        assert len(answers) == (2 if group else 2 * len(QUERIES))
        for _, res in answers:
            assert res.version == version and len(res.hits) == 20
            assert len({h.row for h in res.hits}) == 20
            for h in res.hits:
                stored = rows[h.row]
                assert h.id == stored["id"] and h.metadata["prompt"] == stored["prompt"]
                assert h.metadata["response"] == stored["response"]
    ids, scores, served = client.score_all(QUERIES, chunk_size=7, return_version=True)
    calls += 1
    assert served == version and ids == [r["id"] for r in rows] and scores.shape == (len(rows),)
    return calls


def test_counts_agree_and_every_returned_id_is_stored_before_and_after_add(tmp_path, served_index, served_model_dir,
                                                                          served_lm):
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    v1 = IndexRoot(root).current()
    srv = ServerThread(ServerConfig(index_dir=str(root), model_path=served_model_dir, k_cap=20, watch_seconds=0))
    calls = 0
    try:
        srv.wait_ready()
        with InfluenceClient(srv.address, timeout=60) as client:
            rows = check_counts(root, v1, served_lm)
            assert len(rows) == 36
            calls += check_answers(client, rows, v1)

            new = tmp_path / "new.jsonl"
            write_jsonl(new, corpus(11, seed=21, prefix="n"))
            r = CliRunner().invoke(main, ["index", "add", "--index", str(root), "--data", str(new), "--model",
                                          served_model_dir, "--no-progress"], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            v2 = IndexRoot(root).current()
            assert v2 != v1 and srv.run(srv.server.reload()) == v2
            rows2 = check_counts(root, v2, served_lm)
            assert len(rows2) == 47 and rows2[:36] == rows  # the old rows, then the new ones
            assert [r["id"] for r in rows2[36:]] == [f"n{i}" for i in range(11)]
            calls += check_answers(client, rows2, v2)
    finally:
        srv.stop()
    print(f"queries: {calls} (each hit checked against the stored rows), failures: 0")
