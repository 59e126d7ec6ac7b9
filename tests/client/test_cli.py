"""The `forvalue` CLI: eval end to end on a tiny model, and bad input → one line + exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.indexer.examples import write_example


@pytest.fixture(scope="module")
def tiny_dir(served_model_dir):
    """The tiny model as a Hugging Face directory (conftest's session fixture)."""
    return served_model_dir


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "example.jsonl"
    write_example(p, n_classes=3, n_train_per_class=4, n_test_per_class=2, noise=0.25, seed=1)
    return str(p)


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_is_fast_and_lists_commands():
    r = run("--help")
    assert r.exit_code == 0 and "eval" in r.output


@pytest.mark.parametrize("method", ["exact", "inbatch", "shared", "emb"])
def test_eval_json_is_one_object(tiny_dir, example, method):
    r = run("eval", example, "--model", tiny_dir, "--method", method, "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)  # exactly one JSON document: json.loads rejects trailing data
    assert rep["n_valuation"] == 6 and rep["n_train"] == 12 and rep["method"] == method
    for key in ("auc_mean", "auc_std", "recall_mean", "recall_std", "seconds", "peak_memory_mb",
                "clean_auc", "clean_share_top10"):
        assert key in rep


def test_eval_human_output(tiny_dir, example):
    r = run("eval", example, "--model", tiny_dir, "--tokens", "all", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert "AUC" in r.stdout and "Recall" in r.stdout and "clean AUC" in r.stdout


def test_eval_with_separate_train_file(tiny_dir, tmp_path):
    rows = [json.loads(x) for x in open(write_and_read(tmp_path))]
    val = tmp_path / "val.jsonl"
    train = tmp_path / "train.jsonl"
    val.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                           for r in rows if r["split"] == "test"))
    train.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                             for r in rows if r["split"] == "train"))
    r = run("eval", str(val), "--train", str(train), "--model", tiny_dir, "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_train"] == 6


def write_and_read(tmp_path):
    p = tmp_path / "ex.jsonl"
    write_example(p, n_classes=2, n_train_per_class=3, n_test_per_class=1)
    return p


def _bad(tmp_path, rows):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


GOOD = {"prompt": "p", "response": " r", "label": "a", "split": "train"}


@pytest.mark.parametrize("rows, needle", [
    ([GOOD, {"prompt": "p", "label": "a", "split": "test"}], "response"),
    ([GOOD, {**GOOD, "response": "   ", "split": "test"}], "response"),
    ([GOOD, {**GOOD, "split": "dev"}], "split"),
])
def test_bad_rows_exit_2_naming_row(tmp_path, tiny_dir, rows, needle):
    path = _bad(tmp_path, rows)
    r = run("eval", path, "--model", tiny_dir, "--json")
    assert r.exit_code == 2
    assert r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and path in line and "row 1" in line and needle in line


def test_unreadable_file_exit_2(tmp_path, tiny_dir):
    r = run("eval", str(tmp_path / "nope.jsonl"), "--model", tiny_dir)
    assert r.exit_code == 2 and "nope.jsonl" in r.stderr


def test_missing_model_exit_2(example, tmp_path):
    missing = str(tmp_path / "no-such-model")
    r = run("eval", example, "--model", missing)
    assert r.exit_code == 2 and missing in r.stderr and "Traceback" not in r.stderr


def test_example_command_writes_rows(tmp_path):
    out = tmp_path / "sub" / "ex.jsonl"
    r = run("example", "--out", str(out), "--classes", "2", "--train-per-class", "2", "--test-per-class", "1")
    assert r.exit_code == 0
    assert len(out.read_text().splitlines()) == 6


def test_example_facts_writes_the_fact_tracing_set(tmp_path):
    out = tmp_path / "facts.jsonl"
    r = run("example", "--facts", "--out", str(out), "--people", "3", "--fields", "2", "--templates", "2")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * 2 * (2 + 1 + 1) and {r["role"] for r in rows} == {"statement", "distractor", "question"}
    r = run("example", "--facts", "--out", str(out), "--templates", "9")
    assert r.exit_code == 2 and "n_templates" in r.stderr


@pytest.mark.slow
def test_eval_default_model_on_example(tmp_path):
    """The main job on the real default model: same-class training rows rank first."""
    p = tmp_path / "ex.jsonl"
    write_example(p, n_classes=3, n_train_per_class=6, n_test_per_class=2, seed=0)
    r = run("eval", str(p), "--tokens", "all", "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"] == "SmolLM2-135M-Instruct"
    assert rep["auc_mean"] > 0.9 and rep["recall_mean"] > 0.7


def test_index_build_info_eval(tiny_dir, example, tmp_path):
    out = str(tmp_path / "idx")
    r = run("index", "build", "--data", example, "--split", "train", "--out", out, "--model", tiny_dir,
            "--dim", "128", "--rank", "4", "--shard-size", "5", "--no-progress")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["version"] == "v000001" and summary["n_samples"] == 12 and summary["sketch_dim"] == 128
    info = json.loads(run("index", "info", out).stdout)
    assert info["version"] == info["current"] == "v000001" and info["model"]["name"] == tiny_dir
    assert "files" not in info
    r = run("eval", example, "--index", out, "--model", tiny_dir, "--rerank", "12", "--json", "--no-progress")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    # rerank = every row: the index's answers are exact For-Value's
    assert rep["fidelity_top10_most"] == rep["fidelity_top10_least"] == 1.0
    assert rep["candidate_recall_most"] == 1.0
    assert abs(rep["auc_mean"] - rep["exact_auc_mean"]) < 1e-6 and rep["max_abs_score_diff"] < 1e-3
    assert abs(rep["topk_auc_mean"] - rep["exact_auc_mean"]) < 1e-6


def test_index_add_and_bad_dim(tiny_dir, example, tmp_path):
    out = str(tmp_path / "idx")
    assert run("index", "build", "--data", example, "--split", "train", "--out", out, "--model", tiny_dir,
               "--dim", "64", "--rank", "4", "--no-progress").exit_code == 0
    r = run("index", "add", "--index", out, "--data", example, "--split", "test", "--model", tiny_dir, "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_samples"] == 18
    r = run("index", "build", "--data", example, "--out", out, "--model", tiny_dir, "--dim", "65", "--rank", "4")
    assert r.exit_code == 2 and "--dim" in r.stderr
    r = run("index", "info", str(tmp_path / "nothing"))
    assert r.exit_code == 2


def test_index_build_killed_then_resumed_equals_clean(tiny_dir, tmp_path):
    """kill -9 a real `forvalue index build` after some shards; the rerun resumes and equals a clean build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from forvalue.indexer.store import IndexRoot

    data = tmp_path / "train.jsonl"
    write_example(data, n_classes=4, n_train_per_class=25, n_test_per_class=1)
    args = ["index", "build", "--data", str(data), "--split", "train", "--model", tiny_dir, "--dim", "64",
            "--rank", "4", "--shard-size", "4", "--no-progress"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from forvalue.client.cli import main; main()", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = []
    while time.monotonic() < deadline and proc.poll() is None:
        done = list(killed.glob("builds/*/shards/[0-9]*/_DONE.json"))
        if len(done) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "CURRENT").exists() and len(done) >= 3
    kept = {d.parent.name: os.stat(d).st_ino for d in done}

    r = run(*args, "--out", str(killed))
    assert r.exit_code == 0, r.stderr
    assert run(*args, "--out", str(tmp_path / "clean")).exit_code == 0
    a, b = IndexRoot(str(killed)).load(), IndexRoot(str(tmp_path / "clean")).load()
    assert a.n == b.n == 100
    ids_a = [row["id"] for row in a.rows(np.arange(a.n))]
    assert ids_a == [row["id"] for row in b.rows(np.arange(b.n))] and len(set(ids_a)) == 100
    np.testing.assert_allclose(a.array("sketch"), b.array("sketch"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.token_rows(np.arange(100))["h"], b.token_rows(np.arange(100))["h"], rtol=1e-5, atol=1e-5)
    assert not list(killed.glob("builds/*"))  # the finished build was published, nothing left behind
    for shard, inode in kept.items():  # shards finished before the kill were reused, not recomputed
        assert os.stat(a.path / "shards" / shard / "_DONE.json").st_ino == inode


def test_field_options_build_one_field_map(tmp_path):
    """Every FieldMap field has its --X-field option; a clash is one line naming it, exit 2."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"q": "p", "a": " r", "label": "x", "split": "train"}\n')
    r = CliRunner().invoke(main, ["index", "build", "--data", str(data), "--out", str(tmp_path / "i"),
                                  "--prompt-field", "q", "--response-field", "q"])
    assert r.exit_code == 2 and "same column 'q'" in r.output and "--response-field" in r.output
    r = CliRunner().invoke(main, ["index", "build", "--help"])
    assert "--image-field" in r.output and "--prompt-field" in r.output


def test_serve_options_reach_the_server_config(tmp_path, monkeypatch):
    import forvalue.server.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda config, address, announce=None: seen.update(config=config, address=address))
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path), "--port", "0", "--max-explain-pairs", "4",
                                  "--enable-admin", "--insecure-admin"])
    assert r.exit_code == 0, r.output
    cfg = seen["config"]
    assert (cfg.max_explain_pairs, cfg.default_explain_pairs, cfg.admin) == (4, 4, True)
    assert "--enable-admin without --token-file" in r.output


def test_dtype_and_batch_tokens_reach_the_build(tiny_dir, example, tmp_path):
    """--dtype bfloat16 builds in half precision (recorded in the manifest); --batch-tokens N is used as
    given and auto is 4096 on a CPU; a bad value is one line naming the option, exit 2."""
    out = str(tmp_path / "idx")
    r = run("index", "build", "--data", example, "--split", "train", "--out", out, "--model", tiny_dir,
            "--dim", "64", "--rank", "4", "--no-progress", "--dtype", "bfloat16", "--batch-tokens", "300")
    assert r.exit_code == 0, r.stderr
    info = json.loads(run("index", "info", out).stdout)
    assert info["forward_dtype"] == "bfloat16"
    assert info["forward"] == {"device": "cpu", "dtype": "bfloat16", "batch_tokens": 300, "max_batch": 64}
    out2 = str(tmp_path / "idx2")
    r = run("index", "build", "--data", example, "--split", "train", "--out", out2, "--model", tiny_dir,
            "--dim", "64", "--rank", "4", "--no-progress")
    assert r.exit_code == 0, r.stderr
    info = json.loads(run("index", "info", out2).stdout)
    assert "forward_dtype" not in info and info["forward"]["dtype"] == "float32"
    assert info["forward"]["batch_tokens"] == 4096
    for bad in ("0", "lots"):
        r = run("index", "build", "--data", example, "--out", out2, "--model", tiny_dir, "--batch-tokens", bad)
        assert r.exit_code == 2 and "--batch-tokens" in r.output and "auto" in r.output
    r = run("eval", example, "--model", tiny_dir, "--dtype", "int8")
    assert r.exit_code == 2 and "--dtype" in r.output


def test_dtype_reaches_the_server_config(tmp_path, monkeypatch):
    import forvalue.server.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda config, address, announce=None: seen.update(config=config))
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path), "--port", "0", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert seen["config"].dtype == "float16"
