"""`forvalue query --where/--group-by`, `rank --where`, `index delete` and `serve --enable-admin` (issue 10)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.indexer.filters import Where
from forvalue.indexer.index import Index
from forvalue.indexer.store import IndexRoot

PROMPT, RESPONSE = "Reverse: red cat sun ->", " sun cat red"


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("where", ["index", "server"])
def test_query_where_json(sources, local_index, where):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--rerank", "36",
            "--where", "source=b", "--where", "n_words=2", "--where", "n_words=3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = local_index.search([(PROMPT, RESPONSE)], k=3, rerank=36,
                             where=Where.parse(["source=b", "n_words=2", "n_words=3"]))
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref.hits] and out["hits"]
    assert all(h["metadata"]["meta"]["source"] == "b" if "meta" in h["metadata"] else h["metadata"]["source"] == "b"
               for h in out["hits"])
    assert out["hits"][0]["percentile"] == pytest.approx(ref.hits[0].percentile)
    assert out["hits"][0]["cosine"] == pytest.approx(ref.hits[0].cosine, abs=1e-6)


@pytest.mark.parametrize("where", ["index", "server"])
def test_query_group_by(sources, local_index, where):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "2", "--group-by", "source",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = local_index.group_by([(PROMPT, RESPONSE)], "source", k=2)
    assert [g["key"] for g in out["groups"]] == [g.key for g in ref.groups]
    assert [g["total"] for g in out["groups"]] == pytest.approx([g.total for g in ref.groups], rel=1e-5)
    assert [[h["id"] for h in g["hits"]] for g in out["groups"]] == [[h.id for h in g.hits] for g in ref.groups]
    table = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "--group-by", "source")
    assert table.exit_code == 0 and table.stdout.splitlines()[1].split()[:4] == ["source", "count", "total", "mean"]
    assert {line.split()[0] for line in table.stdout.splitlines()[2:]} == {"a", "b"}


def test_query_bad_where_and_group_by(sources):
    r = run("query", *sources["index"], "--response", RESPONSE, "--where", "source")
    assert r.exit_code == 2 and "FIELD=VALUE" in r.output
    r = run("query", *sources["index"], "--response", RESPONSE, "--where", "sourse=a")
    assert r.exit_code == 2 and "sourse" in r.output
    r = run("query", *sources["server"], "--response", RESPONSE, "--group-by", "prompt")
    assert r.exit_code != 0 and "group_by" in r.output
    r = run("query", *sources["index"], "--response", RESPONSE, "--group-by", "source", "--explain")
    assert r.exit_code == 2 and "--group-by cannot be combined" in r.output


@pytest.mark.parametrize("where", ["index", "server"])
def test_rank_where(tmp_path, sources, local_index, where):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": PROMPT, "response": RESPONSE}) + "\n")
    out = tmp_path / "scores.jsonl"
    r = run("rank", *sources[where], "--valuation", str(val), "--out", str(out), "--where", "source=a", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ref = local_index.scores([], Where.parse(["source=a"]), features=local_index.encode([(PROMPT, RESPONSE)]))
    want = {local_index.version.rows([r_])[0]["id"]: s for r_, s in zip(ref.rows, ref.values)}
    assert {row["id"] for row in rows} == set(want) and len(rows) == 18
    for row in rows:
        assert row["score"] == pytest.approx(want[row["id"]], rel=1e-5, abs=1e-6)


def test_index_delete(tmp_path, served_index, served_lm):
    root = tmp_path / "idx"
    shutil.copytree(served_index[0], root)
    before = IndexRoot(root).current()
    ids = tmp_path / "ids.txt"
    ids.write_text("# takedown\ns3\ns5\nnope\n")
    r = run("index", "delete", "--index", str(root), "--ids", str(ids))
    assert r.exit_code == 2 and "'nope'" in r.output and "nothing was deleted" in r.output
    assert IndexRoot(root).current() == before
    r = run("index", "delete", "--index", str(root), "--ids", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "missing.txt" in r.output
    r = run("index", "delete", "--index", str(root), "--ids", str(ids), "--missing", "ignore")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["published"] and out["deleted"] == ["nope", "s3", "s5"] and out["unknown"] == ["nope"]
    assert out["hidden_rows"] == 2 and IndexRoot(root).current() == out["version"] != before
    idx = Index.open(str(root), served_lm)
    got = idx.search([(PROMPT, RESPONSE)], k=36, rerank=36)
    assert len(got.hits) == 34 and not {"s3", "s5"} & {h.id for h in got.hits}


@pytest.mark.parametrize("where", ["index", "server"])
def test_query_certified_scores(sources, local_index, where):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--rerank", "20",
            "--scores", "certified", "--exact-budget", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = local_index.search([(PROMPT, RESPONSE)], k=3, rerank=20, scores="certified", exact_budget=1)
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref.hits]
    assert [h["rank_certified"] for h in out["hits"]] == [h.rank_certified for h in ref.hits]
    assert [v for h in out["hits"] for v in (h["score_low"], h["score_high"])] == pytest.approx(
        [v for h in ref.hits for v in (h.score_low, h.score_high)])
    assert (out["scores"], out["set_certified"], out["certified_prefix"]) == ("certified", ref.set_certified,
                                                                             ref.certified_prefix)
    table = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--rerank", "20",
                "--scores", "certified")
    assert table.exit_code == 0 and "certified scores" in table.stdout and ".." in table.stdout
    bad = run("query", *sources[where], "--response", RESPONSE, "--scores", "certified", "--group-by", "source")
    assert bad.exit_code != 0 and "--scores certified" in bad.output
