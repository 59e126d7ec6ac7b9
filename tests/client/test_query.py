"""`forvalue query` (in-process and against a server) and `forvalue serve` (a real process, SIGTERM)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from forvalue.client.cli import main

from serving import corpus, expect_line, serve_process

PROMPT, RESPONSE = "Reverse: red cat sun ->", " sun cat red"


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("where", ["index", "server"])
@pytest.mark.parametrize("least", [False, True])
def test_query_json_equals_in_process_search(sources, local_index, where, least):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "4", "--rerank", "12",
            "--json", *(["--least"] if least else []))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = local_index.search([(PROMPT, RESPONSE)], k=4, direction="least" if least else "most", rerank=12)
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref.hits]
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3, 4]
    assert out["hits"][0]["score"] == pytest.approx(ref.hits[0].score, rel=1e-5, abs=1e-5)
    assert out["hits"][0]["metadata"] == ref.hits[0].metadata
    assert (out["version"], out["direction"], out["n_queries"]) == (ref.version, ref.direction, 1)


@pytest.mark.parametrize("where", ["index", "server"])
def test_query_table(sources, local_index, where):
    r = run("query", *sources[where], "--prompt", PROMPT, "--response", RESPONSE, "-k", "3")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "version v000001" in lines[0] and "3 most valuable" in lines[0]
    assert lines[1].split()[:5] == ["rank", "score", "pct", "cos", "id"]
    ref = local_index.search([(PROMPT, RESPONSE)], k=3)
    for line, hit in zip(lines[2:], ref.hits):
        rank, score, pct, cos, id_, *snippet = line.split()
        assert (int(rank), id_) == (hit.rank, hit.id)
        assert float(score) == pytest.approx(hit.score, rel=1e-5)
        assert float(pct.rstrip("%")) == pytest.approx(100 * hit.percentile, abs=0.051)
        assert float(cos) == pytest.approx(hit.cosine, abs=5e-4)
        assert " ".join(snippet).startswith(" ".join(hit.metadata["prompt"].split()))
    assert len(lines) == 5


def test_query_valuation_file_is_a_group(sources, local_index, tmp_path):
    queries = corpus(3, seed=11, prefix="v")
    path = tmp_path / "valuation.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "response": s.response}) + "\n" for s in queries))
    r = run("query", *sources["server"], "--valuation", str(path), "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    ref = local_index.search(queries, k=3)
    assert out["n_queries"] == 3 and [h["id"] for h in out["hits"]] == [h.id for h in ref.hits]


@pytest.mark.parametrize("args,message", [
    (["--response", " r"], "exactly one of --server"),
    (["--server", "127.0.0.1:1", "--index", "x", "--response", " r"], "exactly one of --server"),
    (["--server", "SERVER"], "exactly one of --response"),
    (["--server", "SERVER", "--response", "   "], "--response must not be empty"),
    (["--server", "SERVER", "--response", " r", "-k", "21"], "INVALID_ARGUMENT: k: must be between 1 and 20"),
    (["--index", "NOINDEX", "--model", "MODEL", "--response", " r"], "no version"),
])
def test_query_errors_are_one_line_exit_2(influence_server, served_model_dir, tmp_path, args, message):
    args = [{"SERVER": influence_server.address, "MODEL": served_model_dir, "NOINDEX": str(tmp_path)}.get(a, a)
            for a in args]
    r = CliRunner().invoke(main, ["query", *args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("forvalue: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_serve_process_answers_then_drains_on_sigterm(served_index, served_model_dir, local_index):
    from forvalue.client.client import InfluenceClient

    with serve_process(["--index", served_index[0], "--model", served_model_dir, "--port", "0", "--grace", "5",
                        "--metrics-port", "0"]) as (proc, lines):
        address = expect_line(lines, "listening on").split("listening on ")[1].split(";")[0]
        metrics_url = expect_line(lines, "metrics on ").split("metrics on ")[1].strip()
        expect_line(lines, "serving")
        with InfluenceClient(address, timeout=60) as c:
            assert c.health() == "SERVING"
            res = c.search([(PROMPT, RESPONSE)], k=3)
            assert [h.id for h in res.hits] == [h.id for h in local_index.search([(PROMPT, RESPONSE)], k=3).hits]
        with urllib.request.urlopen(metrics_url, timeout=10) as scraped:
            families = text_string_to_metric_families(scraped.read().decode())
            assert [(s.labels, s.value) for f in families for s in f.samples
                    if s.name == "forvalue_requests_total"] == [({"method": "TopK", "code": "OK"}, 1)]
        proc.send_signal(signal.SIGTERM)
        expect_line(lines, "stopping")
        assert proc.wait(timeout=60) == 0
        expect_line(lines, "stopped")


def test_cli_and_client_package_import_nothing_heavy():
    code = ("import sys, forvalue.client, forvalue.client.cli; "
            "print(sorted(m for m in ('torch', 'grpc', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    from forvalue.client import InfluenceClient
    from forvalue.client.client import InfluenceClient as direct

    assert InfluenceClient is direct
