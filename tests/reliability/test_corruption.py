"""Every file of a published version, and CURRENT, truncated, extended by one byte, or with one byte flipped.

Each damage is refused by name: `IndexRoot.load(verify=True)` raises IndexCorruptError naming the file,
`forvalue index info` exits 2 naming it, and a running server asked to `reload()` keeps serving the
previous good version with unchanged answers.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.client.client import InfluenceClient
from forvalue.indexer.errors import IndexCorruptError
from forvalue.indexer.store import IndexRoot
from forvalue.server.config import ServerConfig

from serving import ServerThread, corpus

QUERIES = [(s.prompt, s.response) for s in corpus(2, seed=13, prefix="q")]


def truncate(data: bytes, rng) -> bytes:
    return data[: len(data) // 2]


def extend(data: bytes, rng) -> bytes:
    return data + b"\0"


def flip(data: bytes, rng) -> bytes:
    out = bytearray(data)
    out[int(rng.integers(len(out)))] ^= 0xFF
    return bytes(out)


DAMAGES = (truncate, extend, flip)


def answers(client: InfluenceClient) -> list:
    """(version, direction, [(id, row, score)]) of TopK (most and least) and the ScoreAll of QUERIES."""
    out = [(r.version, r.direction, [(h.id, h.row, h.score) for h in r.hits])
           for _, r in client.top_k(QUERIES, k=5, direction="both", rerank=12)]
    ids, scores = client.score_all(QUERIES)
    return out + [(ids, scores.tolist())]


def test_every_damaged_file_is_refused_by_name_and_the_old_version_keeps_serving(tmp_path, served_index,
                                                                              served_model_dir):
    rng = np.random.default_rng(0)
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    idx = IndexRoot(root)
    v1 = idx.current()
    srv = ServerThread(ServerConfig(index_dir=str(root), model_path=served_model_dir, k_cap=20, watch_seconds=0))
    damaged = 0
    try:
        srv.wait_ready()
        with InfluenceClient(srv.address, timeout=60) as client:
            before = answers(client)
            # v000002: a copy of v1 made CURRENT; each of its files is damaged in turn, then restored
            shutil.copytree(idx.version_dir(v1), idx.version_dir("v000002"))
            idx.set_current("v000002")
            files = {f"versions/v000002/{p.relative_to(idx.version_dir('v000002')).as_posix()}": p
                     for p in sorted(idx.version_dir("v000002").rglob("*")) if p.is_file()}
            files["CURRENT"] = root / "CURRENT"
            assert {"versions/v000002/manifest.json", "versions/v000002/projection.npy",
                    "versions/v000002/shards/000002/metadata.jsonl", "versions/v000002/shards/000000/rowindex.npy",
                    "versions/v000002/shards/000001/h.npy", "versions/v000002/shards/000000/_DONE.json"} <= set(files)
            for rel, path in files.items():
                good = path.read_bytes()
                for damage in DAMAGES:
                    path.write_bytes(damage(good, rng))
                    try:
                        with pytest.raises(IndexCorruptError, match=re.escape(rel)) as caught:
                            idx.load(verify=True)
                        r = CliRunner().invoke(main, ["index", "info", "--index", str(root)], catch_exceptions=False)
                        assert r.exit_code == 2 and rel in r.stderr, (rel, damage.__name__, r.output)
                        assert srv.run(srv.server.reload()) == v1, (rel, damage.__name__)
                        assert answers(client) == before, (rel, damage.__name__)
                    finally:
                        path.write_bytes(good)
                    damaged += 1
                    assert rel in str(caught.value)

            # restored, v000002 loads and is served, with the same answers (it is a copy of v1)
            assert CliRunner().invoke(main, ["index", "info", "--index", str(root)]).exit_code == 0
            assert srv.run(srv.server.reload()) == "v000002"
            assert [a[2] for a in answers(client)[:2]] == [a[2] for a in before[:2]]
    finally:
        srv.stop()
    print(f"damaged files refused: {damaged} ({len(files)} files x {len(DAMAGES)} damages), failures: 0")
    assert damaged == len(files) * len(DAMAGES) and len(files) >= 37
