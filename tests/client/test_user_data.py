"""A user's own conversational fine-tuning file, end to end: build with --data/--out (and --id-field), add more
rows without repeating a flag, query with a conversation, and select rows that come back exactly as read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from factories import make_chat_tokenizer
from forvalue.client.cli import main

TOPICS = {"math": ("What is {a} plus {a}?", "It is {b}."), "color": ("Name a color like {a}.", "Maybe {a} blue.")}


def conversation(topic: str, i: int) -> list[dict]:
    q, a = TOPICS[topic]
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": q.format(a=i, b=2 * i)},
            {"role": "assistant", "content": a.format(a=i, b=2 * i)}]


def rows(start: int, n: int) -> list[dict]:
    return [{"uid": f"{topic}-{i}", "messages": conversation(topic, i), "topic": topic, "extra": {"tags": [topic, i]}}
            for i in range(start, start + n) for topic in TOPICS]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, model32):
    d = tmp_path_factory.mktemp("tiny-chat")
    model32.save_pretrained(d)
    make_chat_tokenizer().save_pretrained(d)
    return str(d)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_lines(path, items):
    lines = [json.dumps(r, ensure_ascii=False) for r in items]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_own_chat_file_end_to_end(chat_model_dir, tmp_path):
    first = write_lines(tmp_path / "train.jsonl", rows(0, 6))
    more = write_lines(tmp_path / "more.jsonl", rows(6, 3))
    idx, model = tmp_path / "idx", ("--model", chat_model_dir)
    r = run("index", "build", "--data", tmp_path / "train.jsonl", "--index", idx, "--id-field", "uid", *model,
            "--dim", "64", "--rank", "4", "--no-progress")
    assert r.exit_code == 0, r.output
    info = json.loads(run("index", "info", "--index", idx, "--no-verify").stdout)
    assert info["data"] == {"format": "messages", "template": "plain", "turns": "all", "fields": {"id": "uid"}}

    r = run("index", "add", "--index", idx, "--data", tmp_path / "more.jsonl", *model, "--no-progress")
    assert r.exit_code == 0, r.output
    r = run("index", "add", "--index", idx, "--data", tmp_path / "more.jsonl", *model, "--no-progress")
    assert r.exit_code == 0, r.output  # the same rows again (same ids, same content): skipped
    assert "nothing to add; every row is in version v000002 already" in r.output
    assert json.loads(run("index", "info", "--index", idx, "--no-verify").stdout)["n_samples"] == 18
    changed = [dict(json.loads(line), messages=conversation("color", 99)) if i == 0 else json.loads(line)
               for i, line in enumerate(more)]
    write_lines(tmp_path / "changed.jsonl", changed)
    r = run("index", "add", "--index", idx, "--data", tmp_path / "changed.jsonl", *model)
    assert r.exit_code == 2 and f"id {changed[0]['uid']!r} is already in index version v000002 with other content" \
        in r.output and len(r.output.strip().splitlines()) == 1
    r = run("index", "add", "--index", idx, "--data", tmp_path / "more.jsonl", *model, "--turns", "last")
    assert r.exit_code == 2 and "error: --turns 'last' differs from the index's turns 'all'" in r.output

    (tmp_path / "q.jsonl").write_text(json.dumps({"messages": conversation("math", 40)}) + "\n")
    r = run("query", "--index", idx, *model, "--valuation", tmp_path / "q.jsonl", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 3 and all(h["id"].split("-")[0] in TOPICS for h in hits)

    out, sel = tmp_path / "scores.jsonl", tmp_path / "selected.jsonl"
    r = run("rank", "--index", idx, *model, "--valuation", tmp_path / "q.jsonl", "--out", out, "--select", "50%",
            "--selected-out", sel, "--json")
    assert r.exit_code == 0, r.output
    got = sel.read_text().splitlines()
    assert len(got) == 9 and set(got) <= set(first + more)
    ranked = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in ranked if row["selected"]] == [json.loads(line)["uid"] for line in got]


def test_add_without_id_column_skips_rows_already_in(chat_model_dir, tmp_path, caplog):
    items = [{k: v for k, v in r.items() if k != "uid"} for r in rows(0, 4)]
    write_lines(tmp_path / "a.jsonl", items)
    write_lines(tmp_path / "b.jsonl", items[2:] + [{k: v for k, v in r.items() if k != "uid"} for r in rows(4, 1)])
    idx, model = tmp_path / "idx", ("--model", chat_model_dir)
    assert run("index", "build", "--data", tmp_path / "a.jsonl", "--index", idx, *model, "--dim", "64", "--rank", "4",
               "--no-progress").exit_code == 0
    r = run("index", "add", "--index", idx, "--data", tmp_path / "b.jsonl", *model, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "skipped 6 row(s) already in index version v000001" in caplog.text
    assert json.loads(run("index", "info", "--index", idx, "--no-verify").stdout)["n_samples"] == 10
