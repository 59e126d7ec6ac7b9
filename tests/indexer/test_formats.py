"""The fine-tuning formats are read as they are: detection, conversations, content ids, warnings, errors."""

from __future__ import annotations

import json
import logging

import pytest

from forvalue.indexer.data import FieldMap, content_id, read_corpus, read_samples, remembered
from forvalue.indexer.errors import ConfigError, DataError
from forvalue.indexer.formats import Chat, Schema

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one(tmp_path, row, schema=Schema(), fields=FieldMap()):
    samples, found = read_corpus(write(tmp_path / "d.jsonl", [row]), fields, schema=schema)
    return samples[0], found


def test_messages_all_turns_or_the_last(tmp_path):
    s, found = one(tmp_path, {"messages": CONV, "source": "x"})
    assert found.format == "messages"
    assert s.chat == Chat(tuple((m["role"], m["content"]) for m in CONV), (2, 4))
    assert (s.prompt, s.response) == ("user: Hi\nassistant: Hello!\nuser: 2+2?", "4")  # shown without the system turn
    assert s.meta == {"source": "x"}
    s, _ = one(tmp_path, {"messages": CONV}, Schema(turns="last"))
    assert s.chat.scored == (4,)


def test_sharegpt_conversations(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    s, found = one(tmp_path, row)
    assert found.format == "messages" and s.chat == Chat((("user", "Hi"), ("assistant", "Hello!")), (1,))
    assert (s.prompt, s.response) == ("Hi", "Hello!")


def test_prompt_completion_strings_and_conversational(tmp_path):
    s, found = one(tmp_path, {"prompt": "2+2=", "completion": "4"})
    assert found.format == "prompt-completion" and (s.prompt, s.response, s.chat) == ("2+2=", "4", None)
    row = {"prompt": CONV[:4], "completion": [CONV[4]]}
    s, _ = one(tmp_path, row)
    assert s.chat.scored == (4,)  # the completion's turn only, not the earlier assistant turn of the prompt


@pytest.mark.parametrize("extra, prompt", [("", "Add"), ("2 and 2", "Add\n\n2 and 2"), (None, "Add")])
def test_instruction_alpaca(tmp_path, extra, prompt):
    row = {"instruction": "Add", "output": "4"} | ({} if extra is None else {"input": extra})
    s, found = one(tmp_path, row)
    assert found.format == "instruction" and (s.prompt, s.response) == (prompt, "4")


def test_format_string_template_uses_columns(tmp_path):
    s, _ = one(tmp_path, {"prompt": "2+2", "response": "4", "topic": "math"},
               Schema(template="[{topic}] Q: {prompt} A:"))
    assert s.prompt == "[math] Q: 2+2 A:"
    with pytest.raises(DataError, match="row 0.*nope"):
        one(tmp_path, {"prompt": "2+2", "response": "4"}, Schema(template="{nope} {prompt}"))


def test_content_ids_survive_reordering_and_duplicates_are_skipped(tmp_path, caplog):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(4)]
    a = read_samples(write(tmp_path / "a.jsonl", rows))
    b = read_samples(write(tmp_path / "b.jsonl", rows[::-1]))
    assert {s.id: s.response for s in a} == {s.id: s.response for s in b}
    assert all(s.auto_id for s in a) and a[0].id == content_id(rows[0])
    with caplog.at_level(logging.WARNING):
        c = read_samples(write(tmp_path / "c.jsonl", rows + [rows[1]]))
    assert [s.id for s in c] == [s.id for s in a]
    assert "skipped 1 row(s) repeating an earlier row exactly (first: row 4)" in caplog.text
    # explicit ids are the user's: a repeated one is an error
    with pytest.raises(DataError, match="duplicate id 'x'"):
        read_samples(write(tmp_path / "d.jsonl", [dict(rows[0], id="x"), dict(rows[1], id="x")]))


def test_ambiguous_rows_and_unused_text_columns_warn_once(tmp_path, caplog):
    rows = [{"messages": CONV, "prompt": "a few words here", "response": "r", "notes": "a long free text column"}] * 1
    rows.append({"messages": CONV[:3], "prompt": "q", "response": "s", "notes": "more words in here"})
    with caplog.at_level(logging.WARNING):
        _, found = read_corpus(write(tmp_path / "d.jsonl", rows))
    assert found.format == "messages"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "2 row(s) match several formats (row 0: messages and prompt-response); read as messages" in lines[0]
    assert "column(s) notes, prompt hold text that the messages format does not read" in lines[1]


def test_original_row_is_kept(tmp_path):
    row = {"uid": 7, "messages": CONV, "meta": {"nested": [1, {"a": None}]}}
    s, _ = one(tmp_path, row, fields=FieldMap(id="uid"))
    assert s.id == "7" and not s.auto_id and s.original() == row


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "role 'robot'"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image"}]}]}, "'image' part"),
    ({"messages": "Hi"}, "list of"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}, "empty"),
    ({"text_only": "hello there"}, "no fine-tuning format"),
])
def test_bad_conversations_name_row_and_field(tmp_path, row, match):
    with pytest.raises(DataError, match=match) as err:
        one(tmp_path, row)
    assert "row 0" in str(err.value)


def test_later_row_of_another_format_is_an_error(tmp_path):
    with pytest.raises(DataError, match="row 1.*messages"):
        read_samples(write(tmp_path / "d.jsonl", [{"messages": CONV}, {"prompt": "p", "response": "r"}]))


def test_remembered_schema_and_conflicting_flags():
    kept = Schema(format="messages", turns="last", fields={"id": "uid"}).to_json()
    fields, schema = remembered(kept, FieldMap(), {})
    assert fields.id == "uid" and schema.turns == "last" and schema.format == "messages"
    _, q = remembered(kept, FieldMap(), {"turns": "last"}, queries=True)
    assert q.format == "auto" and q.template == "chat"
    with pytest.raises(ConfigError, match="--turns 'all' differs from the index's turns 'last'"):
        remembered(kept, FieldMap(), {"turns": "all"})
    with pytest.raises(ConfigError, match="--id-field 'key'"):
        remembered(kept, FieldMap(id="key"), {})
    fields, schema = remembered(None, FieldMap(id="key"), {"template": "chat"})
    assert schema == Schema(template="chat", fields={"id": "key"})


def test_csv_rows_and_json_cells(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "messages", "note"])
        w.writerow(["a", json.dumps(CONV[1:3]), ""])
        w.writerow(["b", json.dumps(CONV), "x, y"])
    samples, found = read_corpus(path)
    assert found.format == "messages" and [s.id for s in samples] == ["a", "b"]
    assert samples[0].chat.scored == (1,) and samples[0].meta == {"note": None} and samples[1].meta == {"note": "x, y"}
    path.write_text("prompt,response\nhi,there,extra\n")
    with pytest.raises(DataError, match="row 0.*3 cells but the header names 2"):
        read_samples(path)
