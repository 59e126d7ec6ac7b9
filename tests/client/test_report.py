"""`forvalue query --explain / --html`, `forvalue rank --html`, colours on a terminal, plain text in a pipe."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.client.report import colour, histogram_svg, query_report, write_html
from forvalue.indexer.results import Explanation, Hit, PairContribution, SearchResult, TokenContribution

from serving import corpus

PROMPT, RESPONSE = "Reverse: red cat sun ->", " sun cat red"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
PAIR = re.compile(r' +("(?:[^"\\]|\\.)*"@[0-9:]+) *× ("(?:[^"\\]|\\.)*"@[0-9]+) +([-+]\S+)')


def run(*args, color=False):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, color=color)


def _query(sources, where, *extra, color=False):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--rerank", "12", *extra,
            color=color)
    assert r.exit_code == 0, r.output
    return r


# --- terminal output -----------------------------------------------------------------------------------


def test_piped_output_is_unchanged_plain_text(sources):
    plain = _query(sources, "index").stdout
    assert _query(sources, "index", "--no-color", color=True).stdout == plain  # --no-color wins over a terminal
    assert not ANSI.search(plain) and plain.splitlines()[1].split()[:2] == ["rank", "score"]


@pytest.mark.parametrize("flag,color", [(None, True), ("--color", False)])
def test_terminal_gets_colours_and_a_compact_table(sources, local_index, flag, color):
    r = _query(sources, "index", *([flag] if flag else []), color=color)
    assert ANSI.search(r.stdout), r.stdout
    lines = ANSI.sub("", r.stdout).splitlines()
    ref = local_index.search([(PROMPT, RESPONSE)], k=3, rerank=12)
    assert len(lines) == 2 + 3 and lines[1].split()[:2] == ["#", "score"] and "id" in lines[1].split()
    for line, hit in zip(lines[2:], ref.hits):
        rank, score, *rest = line.split()
        assert int(rank) == hit.rank and hit.id in rest and float(score) == pytest.approx(hit.score, rel=1e-4)


def test_no_color_env_turns_colours_off(sources, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(_query(sources, "index", color=True).stdout)


@pytest.mark.parametrize("where", ["index", "server"])
def test_explain_prints_top_pairs_under_each_hit(sources, local_index, where):
    plain = _query(sources, where).stdout.splitlines()
    lines = _query(sources, where, "--explain", "--explain-pairs", "2").stdout.splitlines()
    ref = local_index.search([(PROMPT, RESPONSE)], k=3, rerank=12, explain=2)
    assert [line for line in lines if not line.startswith("        ")] == plain  # the hit table as it was
    for i, hit in enumerate(ref.hits):
        at = lines.index(plain[2 + i])
        for line, pair in zip(lines[at + 1 : at + 3], hit.explanation.top_pairs):
            q, t, value = PAIR.fullmatch(line).groups()
            assert q == f"{json.dumps(pair.query_token)}@{pair.query_position}"
            assert t == f"{json.dumps(pair.train_token)}@{pair.train_position}"
            assert float(value) == pytest.approx(pair.contribution, rel=1e-4, abs=1e-4)
    coloured = ANSI.sub("", _query(sources, where, "--explain", "--explain-pairs", "2", color=True).stdout)
    assert coloured.count(" × ") == 6


def test_group_query_pairs_name_the_member(sources, local_index, tmp_path):
    queries = corpus(2, seed=13, prefix="g")
    path = tmp_path / "valuation.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n" for s in queries))
    r = run("query", *sources["server"], "--valuation", str(path), "-k", "2", "--rerank", "12", "--explain",
            "--explain-pairs", "3", "--html", str(tmp_path / "group.html"))
    assert r.exit_code == 0, r.output
    ref = local_index.search([(s.prompt, s.response) for s in queries], k=2, rerank=12, explain=3)
    pairs = [PAIR.fullmatch(line).groups() for line in r.stdout.splitlines()[2:] if PAIR.fullmatch(line)]
    want = [(f"{json.dumps(p.query_token)}@{p.query_sample}:{p.query_position}",
             f"{json.dumps(p.train_token)}@{p.train_position}") for h in ref.hits for p in h.explanation.top_pairs]
    assert [(q, t) for q, t, _ in pairs] == want
    text = (tmp_path / "group.html").read_text(encoding="utf-8")
    assert text.count('<span class="member">') == 2 * 2 * 2  # two members under each of 2 + 2 hits
    assert 'data-sample="1"' in text


def test_explain_json_totals_equal_scores(sources):
    out = json.loads(_query(sources, "server", "--explain", "--json").stdout)
    for h in out["hits"]:
        e = h["explanation"]
        assert e["total"] == pytest.approx(h["score"], rel=1e-5, abs=1e-4) and len(e["top_pairs"]) == 5
        assert sum(t["contribution"] for t in e["query_tokens"]) == pytest.approx(h["score"], rel=1e-5, abs=1e-4)
    assert "explanation" not in json.loads(_query(sources, "server", "--json").stdout)["hits"][0]


def test_rank_summary_colours(sources, tmp_path):
    valuation = tmp_path / "v.jsonl"
    valuation.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n"
                                 for s in corpus(2, seed=3, prefix="v")))
    args = ["rank", *sources["server"], "--valuation", str(valuation), "--out", str(tmp_path / "s.jsonl")]
    plain, coloured = run(*args), run(*args, color=True)
    assert plain.exit_code == coloured.exit_code == 0
    assert not ANSI.search(plain.stderr) and ANSI.search(coloured.stderr)
    assert ANSI.sub("", coloured.stderr) == plain.stderr


# --- HTML reports ----------------------------------------------------------------------------------------


class _Tags(HTMLParser):
    """Every start tag with its attributes, and whether any tag points outside the page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text):
    p = _Tags()
    p.feed(text)
    return p.tags


def _self_contained(text):
    tags = _tags(text)
    assert not [t for t, a in tags if t in ("script", "link", "img", "iframe", "object", "embed")]
    assert not [a for _, a in tags if any(k in a for k in ("src", "href"))]
    assert "http://" not in text and "https://" not in text and "url(" not in text


@pytest.mark.parametrize("where", ["index", "server"])
def test_query_html_report(sources, local_index, tmp_path, where):
    path = tmp_path / "out" / "report.html"
    r = _query(sources, where, "--html", str(path))
    assert r.stdout == _query(sources, where).stdout  # stdout as without --html
    assert f"wrote the report to {path}" in r.stderr
    text = path.read_text(encoding="utf-8")
    _self_contained(text)
    tags = _tags(text)
    hits = {a["id"]: a for t, a in tags if t == "article"}
    refs = {d: local_index.search([(PROMPT, RESPONSE)], k=3, direction=d, rerank=12, explain=5) for d in ("most", "least")}
    assert len(hits) == 6
    for direction, ref in refs.items():
        for h in ref.hits:
            a = hits[f"{direction}-{h.rank}"]
            assert a["data-id"] == h.id and float(a["data-score"]) == pytest.approx(h.score, rel=1e-5)
            # calibrated scores: exact percentile (low = high) and cosine, as data and as text
            assert float(a["data-percentile"]) == float(a["data-percentile-low"]) == float(a["data-percentile-high"])
            assert float(a["data-percentile"]) == pytest.approx(h.percentile, abs=1e-6)
            assert float(a["data-cosine"]) == pytest.approx(h.cosine, rel=1e-4, abs=1e-6)
    from forvalue.client.render import cos, hit_pct

    top = refs["most"].hits[0]
    assert top.percentile == 1.0 and f"percentile {hit_pct(top)}</span>" in text
    assert f"cosine {cos(top.cosine)}</span>" in text
    spans = [a for t, a in tags if t == "span" and "tok" in a.get("class", "").split()]
    train = [float(a["data-contribution"]) for a in spans if "train" in a["class"].split()]
    # one span per scored training token (a character each here, and the EOS), in hit order
    want = [t.contribution for ref in refs.values() for h in ref.hits for t in h.explanation.train_tokens]
    assert train == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert all("title" in a and "background:rgb(" in a["style"] for a in spans)
    assert any(t == "div" and a.get("id") == "legend" for t, a in tags)


def _hit(id_, text, score, tokens):
    e = Explanation(query_tokens=[TokenContribution(text, 0, score, 0)],
                    train_tokens=[TokenContribution(text, 0, score)],
                    top_pairs=[PairContribution(0, 0, text, text, score)], total=score)
    return Hit(id=id_, score=score, rank=1, row=0, metadata={"id": id_, "prompt": text, "response": text},
               explanation=e if tokens else None)


def test_query_report_escapes_untrusted_text(tmp_path):
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>&"\''
    results = [SearchResult([_hit(evil, evil, 2.0, True)], "v1", "most", 1),
               SearchResult([_hit("b\"<", evil, -1.0, False)], "v1", "least", 1)]
    text = query_report([(evil, evil)], results, f"server {evil}")
    _self_contained(text)
    assert "<script" not in text and "<img" not in text
    assert not any("onerror" in a for _, a in _tags(text))
    assert "&lt;script&gt;" in text
    path = tmp_path / "r.html"
    path.write_text("old")
    write_html(path, text)
    assert path.read_text(encoding="utf-8") == text and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_colour_scale_is_diverging():
    assert colour(0.0, 1.0)[0] == "rgb(255,255,255)"
    assert colour(1.0, 1.0)[0] == "rgb(178,24,43)" and colour(5.0, 1.0) == colour(1.0, 1.0)  # clipped
    assert colour(-1.0, 1.0)[0] == "rgb(33,102,172)"
    assert colour(3.0, 0.0)[0] == "rgb(255,255,255)"  # no scale: no colour


def test_histogram_counts_and_cutoff():
    scores = [0.0, 1.0, 1.5, 2.0, 2.0, 9.0]
    svg = histogram_svg(scores, [False, False, False, True, True, True], cutoff=2.0, bins=4)
    tags = _tags(svg)
    bins = [a for t, a in tags if t == "g" and a.get("class") == "bin"]
    assert [int(a["data-count"]) for a in bins] == [5, 0, 0, 1]  # edges 0, 2.25, 4.5, 6.75, 9
    assert [int(a["data-selected"]) for a in bins] == [2, 0, 0, 1]
    (cut,) = [a for t, a in tags if a.get("id") == "cutoff"]
    assert float(cut["data-value"]) == 2.0
    assert 'id="cutoff"' not in histogram_svg(scores)
    assert "data-count" in histogram_svg([3.0, 3.0])  # a zero range still draws


@pytest.mark.parametrize("lowest", [False, True])
def test_rank_html_report(sources, tmp_path, lowest):
    valuation = tmp_path / "v.jsonl"
    valuation.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n"
                                 for s in corpus(2, seed=3, prefix="v")))
    out, html = tmp_path / "s.jsonl", tmp_path / "rank.html"
    r = run("rank", *sources["server"], "--valuation", str(valuation), "--out", str(out), "--select", "25%",
            "--html", str(html), "--json", *(["--lowest"] if lowest else []))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["html"] == str(html) and summary["n_selected"] == 9
    text = html.read_text(encoding="utf-8")
    _self_contained(text)
    tags = _tags(text)
    (cut,) = [a for t, a in tags if a.get("id") == "cutoff"]
    assert float(cut["data-value"]) == pytest.approx(summary["cutoff_score"], rel=1e-5)
    bins = [a for t, a in tags if t == "g" and a.get("class") == "bin"]
    assert sum(int(a["data-count"]) for a in bins) == 36 and sum(int(a["data-selected"]) for a in bins) == 9
    records = [json.loads(line) for line in out.read_text().splitlines()]
    first_ids = re.findall(r"<code>([^<]*)</code>", text.split('id="ends"')[1])[:10]
    assert first_ids == [rec["id"] for rec in records[:10]]
    # each listed row with its percentile (as in --out), cosine and text (a server without --data: none)
    cells = re.findall(r'<td class="num pct">([^<]*)</td><td class="num cos">([^<]*)</td>'
                       r'<td class="text">([^<]*)</td>', text.split('id="ends"')[1])
    assert len(cells) == 20
    for (p, c, t), rec in zip(cells[:10], records[:10]):
        assert p == f"{100 * rec['percentile']:.1f}%" and -1 <= float(c) <= 1 and t == "-"
    top = {t["id"]: t for t in summary["top"]}
    assert all(float(c) == pytest.approx(top[rec["id"]]["cosine"], abs=1e-3)
               for (_, c, _), rec in zip(cells, records[:5]))


def test_rank_html_must_be_its_own_file(sources, tmp_path):
    valuation = tmp_path / "v.jsonl"
    valuation.write_text(json.dumps({"prompt": "p", "response": " r"}) + "\n")
    out = tmp_path / "s.jsonl"
    for html, message in ((out, "names an output"), (valuation, "is an input")):
        r = CliRunner().invoke(main, ["rank", *sources["server"], "--valuation", str(valuation), "--out", str(out),
                                      "--html", str(html)])
        assert r.exit_code == 2 and message in r.stderr, r.output
