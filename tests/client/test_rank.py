"""`forvalue rank`: every training row's value to a valuation set, in-process and through a server; selection."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.indexer.data import read_samples, write_jsonl

from serving import corpus


def run(*args):
    return CliRunner().invoke(main, ["rank", *args], catch_exceptions=False)


def _read(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def valuation(tmp_path_factory):
    """(valuation file, its samples): 4 rows the training corpus does not hold."""
    samples = corpus(4, seed=11, prefix="v")
    path = tmp_path_factory.mktemp("rank") / "valuation.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n" for s in samples))
    return str(path), samples


@pytest.fixture(scope="module")
def reference(local_index, valuation):
    """(training ids in row order, their mean exact value to the valuation set (n,) float64), in-process."""
    scores = local_index.score_matrix(local_index.encode(valuation[1])).mean(0).double().numpy()
    ids = [str(row["id"]) for row in local_index.version.rows(list(range(local_index.n)))]
    return ids, scores


@pytest.fixture(scope="module")
def corpus_file(served_index, tmp_path_factory):
    path = tmp_path_factory.mktemp("rank-data") / "train.jsonl"
    write_jsonl(path, served_index[1])
    return str(path)


@pytest.fixture(scope="module")
def sources(served_index, served_model_dir, influence_server, corpus_file):
    return {"index": ["--index", served_index[0], "--model", served_model_dir],
            "server": ["--server", influence_server.address],
            "server+data": ["--server", influence_server.address, "--data", corpus_file]}


def _best(scores, k, lowest):
    """Row numbers of the k best rows by numpy (ties: lower row first)."""
    return np.argsort(scores if lowest else -scores, kind="stable")[:k].tolist()


@pytest.mark.parametrize("where", ["index", "server"])
def test_scores_equal_in_process_score_all(sources, valuation, reference, local_index, tmp_path, where):
    out = tmp_path / "scores.jsonl"
    batches = ["--batch", "3"] if where == "index" else []  # 4 valuation rows: two forward passes, one mean
    r = run(*sources[where], *batches, "--valuation", valuation[0], "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    ids, ref = reference
    records = _read(out)
    assert sorted(rec["id"] for rec in records) == sorted(ids) and len(records) == len(ids) == 36
    for rec in records:
        assert ids[rec["row"]] == rec["id"]
        assert rec["score"] == pytest.approx(ref[rec["row"]], rel=1e-5, abs=1e-7)
    assert not any(rec["selected"] for rec in records)
    summary = json.loads(r.stdout)
    assert summary["version"] == local_index.version.name
    assert (summary["n_scored"], summary["n_valuation"], summary["n_selected"]) == (36, 4, 0)
    assert summary["cutoff_score"] is None and summary["out"] == str(out) and summary["direction"] == "highest"


@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("where", ["index", "server"])
def test_ranks_and_percentiles_match_a_brute_force_sort(sources, valuation, tmp_path, where, lowest):
    out = tmp_path / "scores.jsonl"
    r = run(*sources[where], "--valuation", valuation[0], "--out", str(out), *(["--lowest"] if lowest else []))
    assert r.exit_code == 0, r.output
    records = _read(out)
    n = len(records)
    by_row = {rec["row"]: rec for rec in records}
    brute = sorted(by_row, key=lambda i: (by_row[i]["score"] if lowest else -by_row[i]["score"], i))
    assert [rec["row"] for rec in records] == brute  # the file is in rank order
    assert [rec["rank"] for rec in records] == list(range(1, n + 1))
    for rec in records:
        lower = sum(other["score"] < rec["score"] for other in records)
        assert rec["percentile"] == pytest.approx(lower / (n - 1), abs=1e-12)


@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("spec,k", [("10%", 4), ("3", 3)])
@pytest.mark.parametrize("where", ["index", "server"])
def test_select_picks_exactly_the_best_rows(sources, valuation, reference, tmp_path, where, spec, k, lowest):
    out = tmp_path / "scores.parquet"
    r = run(*sources[where], "--valuation", valuation[0], "--out", str(out), "--select", spec, "--json",
            *(["--lowest"] if lowest else []))
    assert r.exit_code == 0, r.output
    ids, ref = reference
    best = _best(ref, k, lowest)
    gap = np.sort(ref)[::-1] if not lowest else np.sort(ref)
    assert abs(gap[k - 1] - gap[k]) > 1e-4 * abs(gap[k])  # the cut-off is clear of float noise
    records = _read(out)
    assert [rec["row"] for rec in records if rec["selected"]] == best
    assert [rec["rank"] for rec in records if rec["selected"]] == list(range(1, k + 1))
    summary = json.loads(r.stdout)
    assert summary["n_selected"] == k and summary["direction"] == ("lowest" if lowest else "highest")
    assert summary["cutoff_score"] == pytest.approx(ref[best[-1]], rel=1e-5)


def test_parquet_and_jsonl_outputs_read_back_equal(sources, valuation, tmp_path):
    for name in ("scores.jsonl", "scores.parquet"):
        r = run(*sources["index"], "--valuation", valuation[0], "--out", str(tmp_path / name), "--select", "5")
        assert r.exit_code == 0, r.output
    a, b = _read(tmp_path / "scores.jsonl"), _read(tmp_path / "scores.parquet")
    assert a == b and len(a) == 36 and sum(rec["selected"] for rec in a) == 5


@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("where", ["index", "server+data"])
def test_selected_out_round_trips_to_the_corpus_rows(sources, valuation, reference, served_index, tmp_path, where,
                                                     lowest):
    subset = tmp_path / "subset.jsonl"
    r = run(*sources[where], "--valuation", valuation[0], "--out", str(tmp_path / "scores.jsonl"), "--select", "5",
            "--selected-out", str(subset), *(["--lowest"] if lowest else []))
    assert r.exit_code == 0, r.output
    ids, ref = reference
    by_id = {s.id: s for s in served_index[1]}
    expected = [by_id[ids[i]].to_dict() for i in _best(ref, 5, lowest)]
    got = [s.to_dict() for s in read_samples(subset)]
    assert got == expected
    assert all("source" in row and "label" in row for row in got)  # extra metadata kept, flat


def test_human_summary_on_stderr(sources, valuation, local_index, tmp_path):
    out, subset = tmp_path / "scores.jsonl", tmp_path / "subset.jsonl"
    r = run(*sources["index"], "--valuation", valuation[0], "--out", str(out), "--select", "3", "--lowest",
            "--selected-out", str(subset))
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    text = r.stderr
    assert f"version {local_index.version.name}" in text and "scored 36 training rows" in text
    assert "selected the 3 lowest-valued rows (cut-off score " in text
    assert str(out) in text and str(subset) in text


@pytest.mark.parametrize("args,message,out_name", [
    (["SERVER", "--select", "0%"], "--select '0%'", "scores.jsonl"),
    (["SERVER", "--select", "150%"], "--select '150%'", "scores.jsonl"),
    (["SERVER", "--select", "abc"], "--select 'abc'", "scores.jsonl"),
    (["SERVER", "--select", "37"], "--select '37' asks for more rows than the 36 scored", "scores.jsonl"),
    (["INDEX", "--select", "37"], "--select '37' asks for more rows than the 36 scored", "scores.parquet"),
    (["SERVER"], "--out 'OUTDIR/scores.csv': unsupported extension", "scores.csv"),
    (["SERVER", "--selected-out", "OUTDIR/subset.jsonl"], "--selected-out needs --select", "scores.jsonl"),
    (["SERVER", "--select", "3", "--selected-out", "OUTDIR/subset.parquet"], "--selected-out", "scores.jsonl"),
    (["SERVER", "--select", "3", "--selected-out", "OUTDIR/subset.jsonl"], "needs --data", "scores.jsonl"),
    (["INDEX", "--data", "DATA", "--select", "3", "--selected-out", "OUTDIR/subset.jsonl"], "--data is only read",
     "scores.jsonl"),
    (["SERVER", "INDEX"], "exactly one of --server", "scores.jsonl"),
    ([], "exactly one of --server", "scores.jsonl"),
    (["SERVER", "--select", "3", "--selected-out", "OUTDIR/subset.jsonl", "--data", "PARTIAL"], "MISSING_ID",
     "scores.jsonl"),
    (["INDEX", "--select", "3", "--selected-out", "OUTDIR/file/subset.jsonl"], "OUTDIR/file", "scores.parquet"),
    (["SERVER", "--select", "3", "--selected-out", "OUTDIR/partial.jsonl", "--data", "PARTIAL"],
     "--selected-out 'OUTDIR/partial.jsonl' is an input", "scores.jsonl"),
])
def test_errors_are_one_line_exit_2_and_leave_out_untouched(sources, valuation, reference, served_index,
                                                            tmp_path, args, message, out_name):
    ids, ref = reference
    top = ids[_best(ref, 1, False)[0]]  # the first row --select picks, left out of PARTIAL
    partial = tmp_path / "partial.jsonl"
    write_jsonl(partial, [s for s in served_index[1] if s.id != top])
    (tmp_path / "file").write_text("a regular file, not a folder\n")
    subst = {"SERVER": sources["server"], "INDEX": sources["index"], "DATA": [sources["server+data"][-1]],
             "PARTIAL": [str(partial)]}
    argv = [x for a in args for x in subst.get(a, [a.replace("OUTDIR", str(tmp_path))])]
    out = tmp_path / out_name
    out.write_text("previous\n")
    r = CliRunner().invoke(main, ["rank", *argv, "--valuation", valuation[0], "--out", str(out)])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("forvalue: error:")]
    message = message.replace("MISSING_ID", repr(top)).replace("OUTDIR", str(tmp_path))
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert out.read_text() == "previous\n"
    assert [s.id for s in read_samples(partial)] == [s.id for s in served_index[1] if s.id != top]
    assert not (tmp_path / "subset.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("where", ["index", "server", "server+data"])
@pytest.mark.parametrize("lowest", [False, True])
def test_summary_lists_the_first_rows_with_percentile_cosine_and_text(sources, valuation, reference, local_index,
                                                                      tmp_path, where, lowest):
    from forvalue.client.render import snippet

    ids, scores = reference
    n = len(ids)
    r = run(*sources[where], "--valuation", valuation[0], "--out", str(tmp_path / "s.jsonl"), "--json",
            *(["--lowest"] if lowest else []))
    assert r.exit_code == 0, r.output
    top = json.loads(r.stdout)["top"]
    want = _best(scores, 5, lowest)
    assert [t["row"] for t in top] == want and [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert [t["id"] for t in top] == [ids[i] for i in want]
    cosines = local_index.scores(valuation[1]).cosines
    stored = local_index.version.rows(want)
    for t, i, md in zip(top, want, stored):
        assert t["score"] == pytest.approx(scores[i], rel=1e-5, abs=1e-6)
        assert t["percentile"] == pytest.approx(np.sum(scores < scores[i]) / (n - 1), abs=1e-12)
        assert t["cosine"] == pytest.approx(cosines[i], rel=1e-4, abs=1e-6) and -1 <= t["cosine"] <= 1
        # the row's text: from the index, or from --data for a server (which sends ids and scores only)
        assert t["text"] == (None if where == "server" else snippet(md)) and (t["text"] is None or "→" in t["text"])
    text = run(*sources[where], "--valuation", valuation[0], "--out", str(tmp_path / "s.jsonl"),
               *(["--lowest"] if lowest else [])).stderr
    lines = text.splitlines()
    at = next(j for j, line in enumerate(lines) if line.startswith("forvalue: the first 5 rows"))
    assert lines[at + 1].split()[:5] == ["rank", "score", "pct", "cos", "id"]
    for line, t in zip(lines[at + 2 :], top):
        rank, score, pct, cos, id_, *rest = line.split()
        assert (int(rank), id_) == (t["rank"], t["id"]) and pct == f"{100 * t['percentile']:.1f}%"
        assert cos == f"{t['cosine']:+.3f}"
        assert " ".join(rest) == ("-" if t["text"] is None else " ".join(t["text"].split()))


@pytest.mark.parametrize("where", ["index", "server+data"])
def test_per_label_values_equal_own_label_means_centred_per_label(sources, local_index, served_index, tmp_path, where):
    """--per-label: each row's mean value to the valuation rows of its own label, minus that mean over its label."""
    val = corpus(8, seed=11, prefix="v")
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response, "label": s.label}) + "\n"
                            for s in val))
    rows = local_index.version.rows(list(range(local_index.n)))
    labels = [r.get("label") for r in rows]
    S = local_index.score_matrix(local_index.encode(val)).double().numpy()  # (8, n)
    want = np.empty(len(rows))
    for label in set(labels):
        at = [i for i, x in enumerate(labels) if x == label]
        own = S[[j for j, s in enumerate(val) if s.label == label]][:, at].mean(0)
        want[at] = own - own.mean()
    out = tmp_path / "scores.jsonl"
    r = run(*sources[where], "--valuation", str(path), "--out", str(out), "--per-label", "--lowest", "--json")
    assert r.exit_code == 0, r.output
    got = {row["id"]: row["score"] for row in _read(out)}
    np.testing.assert_allclose([got[str(r["id"])] for r in rows], want, rtol=1e-4, atol=1e-3)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": val[0].prompt, "response": val[0].response, "label": val[0].label}) + "\n")
    r = run(*sources[where], "--valuation", str(one), "--out", str(tmp_path / "s2.jsonl"), "--per-label")
    assert r.exit_code == 2 and "but no valuation row does" in r.output
