"""Tests of forvalue.indexer.data: every reader, every validation error, eval-set loading, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from forvalue.indexer.data import FieldMap, Sample, content_id, load_eval_sets, read_samples, write_jsonl
from forvalue.indexer.errors import DataError

DATAINF = Path("/work/shared/eval/datainf")


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_arrow_dir(folder: Path, rows: list[dict], name: str = "data-00000-of-00001.arrow") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / name), "wb") as sink, ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return folder


def datainf_rows(labels: list[str], start: int = 0) -> list[dict]:
    rows = []
    for k, label in enumerate(labels):
        prompt = f"bot {label} example {start + k} -> "
        rows.append({"prompt": prompt, "text": prompt + f" out{start + k}</s>", "answer": f"out{start + k}",
                     "variation": label})
    return rows


def make_datainf(tmp_path: Path, name: str = "toy") -> Path:
    write_arrow_dir(tmp_path / f"{name}_train.hf", datainf_rows(["A", "A", "B", "B"]))
    write_arrow_dir(tmp_path / f"{name}_test.hf", datainf_rows(["A", "B"], start=10))
    return tmp_path / name


def error_of(call, *args, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        call(*args, **kw)
    return info.value


ROWS = [
    {"prompt": "p0", "response": " r0", "label": "x", "split": "train", "clean": True, "extra": [1, 2]},
    {"prompt": "p1", "response": " r1", "label": "y", "split": "test", "clean": 0},
]


# ------------------------------------------------------------------------------------------ formats


def test_jsonl_fields_meta_ids(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ROWS)
    s = read_samples(path)
    assert [x.id for x in s] == [content_id(ROWS[0]), content_id(ROWS[1])]
    assert s[0] == Sample(id=content_id(ROWS[0]), prompt="p0", response=" r0", label="x", split="train", clean=True,
                          meta={"extra": [1, 2]}, row=0, source=str(path))
    assert s[0].meta == {"extra": [1, 2]}
    assert s[1].clean is False and s[1].split == "test" and s[1].meta == {}
    assert hash(s[0]) == hash(dataclasses.replace(s[0], meta={"other": 1}))


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    s = read_samples(path)
    assert [x.row for x in s] == [0, 3]
    assert [x.id for x in s] == [content_id(ROWS[0]), content_id(ROWS[1])]


def test_id_field_converted_to_str(tmp_path):
    rows = [dict(ROWS[0], id=7), dict(ROWS[1], id="b")]
    s = read_samples(write_lines(tmp_path / "d.jsonl", rows))
    assert [x.id for x in s] == ["7", "b"]


def test_json_lines_and_json_array(tmp_path):
    lines = read_samples(write_lines(tmp_path / "d.json", ROWS))
    array_path = tmp_path / "a.json"
    array_path.write_text(json.dumps(ROWS))
    array = read_samples(array_path)
    assert [x.prompt for x in lines] == [x.prompt for x in array] == ["p0", "p1"]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, extra=None, clean=bool(r["clean"])) for r in ROWS]), path)
    s = read_samples(path)
    assert [(x.prompt, x.response, x.label, x.split) for x in s] == [("p0", " r0", "x", "train"),
                                                                    ("p1", " r1", "y", "test")]
    assert s[1].clean is False  # written as a bool column
    assert s[0].meta == {"extra": None}


def test_field_map(tmp_path):
    rows = [{"q": "p", "a": "r", "cls": 3, "part": "VALIDATION", "ok": "true", "key": "k1"}]
    fields = FieldMap(prompt="q", response="a", label="cls", split="part", clean="ok", id="key")
    (s,) = read_samples(write_lines(tmp_path / "d.jsonl", rows), fields)
    assert (s.id, s.prompt, s.response, s.label, s.split, s.clean, s.meta) == ("k1", "p", "r", "3", "test", True, {})


def test_field_map_validation():
    with pytest.raises(ValueError, match="same column"):
        FieldMap(prompt="text", response="text")
    with pytest.raises(ValueError, match="FieldMap.label"):
        FieldMap(label="")


def test_hf_directory(tmp_path):
    rows = [{"prompt": "p", "response": f"r{i}", "label": "l"} for i in range(3)]
    folder = write_arrow_dir(tmp_path / "x.hf", rows)
    s = read_samples(folder)
    assert [x.id for x in s] == [content_id(r) for r in rows]
    assert s[2].source == str(folder) and s[2].row == 2


def test_hf_directory_shards_continue_row_numbers(tmp_path):
    folder = tmp_path / "x.hf"
    write_arrow_dir(folder, [{"prompt": "p", "response": r} for r in "ab"], "data-00000-of-00002.arrow")
    write_arrow_dir(folder, [{"prompt": "p", "response": r} for r in "cd"], "data-00001-of-00002.arrow")
    s = read_samples(folder)
    assert [(x.row, x.response) for x in s] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]


def test_datainf_prefix(tmp_path):
    s = read_samples(make_datainf(tmp_path))
    assert [x.id for x in s] == ["train/0", "train/1", "train/2", "train/3", "test/0", "test/1"]
    assert [x.split for x in s] == ["train"] * 4 + ["test"] * 2
    assert s[0].response == " out0" and s[4].response == " out10"
    assert s[0].label == "A" and s[0].meta == {"answer": "out0"}
    assert s[4].source == str(tmp_path / "toy_test.hf") and s[4].row == 0


def test_datainf_text_without_eos_kept_whole(tmp_path):
    row = {"prompt": "q -> ", "text": "q -> ans", "variation": "v"}
    (s,) = read_samples(write_lines(tmp_path / "d.jsonl", [row]))
    assert s.response == "ans" and s.label == "v"


@pytest.mark.skipif(not (DATAINF / "grammars_train.hf").is_dir(), reason="DataInf data not present")
def test_real_datainf_grammars():
    s = read_samples(DATAINF / "grammars")
    train = [x for x in s if x.split == "train"]
    test = [x for x in s if x.split == "test"]
    assert len(train) == 900 and len(test) == 100
    assert len({x.label for x in s}) == 10
    assert train[0].response == " night. call winds Whispering"
    assert train[0].label == "Reverse Order of Words"
    assert not any(x.response.endswith("</s>") for x in s)
    valuation, training = load_eval_sets(DATAINF / "grammars")
    assert (len(valuation), len(training)) == (100, 900)


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    err = error_of(read_samples, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err) and "no such file" in str(err)


def test_unreadable_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    err = error_of(read_samples, path)
    assert str(path) in str(err) and "UTF-8" in str(err)


def test_damaged_parquet_and_arrow(tmp_path):
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"not parquet at all")
    assert "Parquet" in str(error_of(read_samples, bad)) and str(bad) in str(error_of(read_samples, bad))
    folder = tmp_path / "x.hf"
    folder.mkdir()
    (folder / "data-00000-of-00001.arrow").write_bytes(b"garbage")
    err = error_of(read_samples, folder)
    assert str(folder) in str(err) and "Arrow" in str(err)


def test_hf_directory_without_arrow(tmp_path):
    (tmp_path / "x.hf").mkdir()
    err = error_of(read_samples, tmp_path / "x.hf")
    assert "data-*.arrow" in str(err) and "x.hf" in str(err)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    err = error_of(read_samples, path)
    assert err.row == 1 and err.path == str(path)
    assert f"{path}, row 1" in str(err) and "invalid JSON" in str(err)


def test_row_not_object(tmp_path):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [ROWS[0], ["p", "r"]]))
    assert "row 1" in str(err) and "not an object" in str(err) and "list" in str(err)


@pytest.mark.parametrize("missing", ["prompt", "response"])
def test_missing_required_field(tmp_path, missing):
    row = {k: v for k, v in ROWS[0].items() if k != missing}
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [ROWS[1], row]))
    assert "row 1" in str(err) and f"missing required field '{missing}'" in str(err)


def test_required_label_via_require(tmp_path):
    row = {"prompt": "p", "response": "r"}
    path = write_lines(tmp_path / "d.jsonl", [row])
    assert read_samples(path)[0].label is None
    err = error_of(read_samples, path, require=("prompt", "response", "label"))
    assert "row 0" in str(err) and "'label'" in str(err)
    with pytest.raises(ValueError, match="unknown fields"):
        read_samples(path, require=("labels",))


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_non_string_prompt_response(tmp_path, field):
    row = dict(ROWS[0], **{field: 5})
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [row]))
    assert f"field '{field}' must be a string" in str(err) and "int" in str(err) and "row 0" in str(err)


@pytest.mark.parametrize("response", ["", "  \n\t"])
def test_empty_response(tmp_path, response):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [ROWS[0], dict(ROWS[1], response=response)]))
    assert "row 1" in str(err) and "'response'" in str(err) and "empty or whitespace-only" in str(err)


def test_datainf_empty_completion(tmp_path):
    row = {"prompt": "q -> ", "text": "q -> </s>", "variation": "v"}
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [row]))
    assert "'text'" in str(err) and "empty" in str(err)


def test_unknown_split(tmp_path):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [ROWS[0], dict(ROWS[1], split="dev")]))
    assert "row 1" in str(err) and "'split'" in str(err) and "'dev'" in str(err) and "train or test" in str(err)


@pytest.mark.parametrize("alias", ["val", "Valid", "validation", " eval ", "TEST"])
def test_split_aliases(tmp_path, alias):
    (s,) = read_samples(write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], split=alias)]))
    assert s.split == "test"


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (1, True), (0, False),
                                            ("true", True), ("FALSE", False), ("1", True), ("0", False),
                                            (None, None)])
def test_clean_values(tmp_path, value, expected):
    (s,) = read_samples(write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], clean=value)]))
    assert s.clean is expected


@pytest.mark.parametrize("value", [2, "yes", [True], 0.5])
def test_clean_not_boolean(tmp_path, value):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], clean=value)]))
    assert "row 0" in str(err) and "'clean'" in str(err) and "boolean" in str(err)


@pytest.mark.parametrize("label", [1.5, [1], ""])
def test_bad_label(tmp_path, label):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], label=label)]))
    assert "row 0" in str(err) and "'label'" in str(err)


def test_bad_id(tmp_path):
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], id={"a": 1})]))
    assert "row 0" in str(err) and "'id'" in str(err)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("prompt,response\np,r\n")
    err = error_of(read_samples, path)
    assert str(path) in str(err) and "unsupported file type '.tsv'" in str(err) and ".jsonl" in str(err)


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    err = error_of(read_samples, path)
    assert str(path) in str(err) and "empty" in str(err)


def test_duplicate_ids(tmp_path):
    rows = [dict(ROWS[0], id="a"), dict(ROWS[1], id="b"), dict(ROWS[1], id="a")]
    err = error_of(read_samples, write_lines(tmp_path / "d.jsonl", rows))
    assert "duplicate id 'a'" in str(err) and "row 0" in str(err) and "row 2" in str(err)


def test_duplicate_ids_across_datainf_parts(tmp_path):
    write_arrow_dir(tmp_path / "t_train.hf", [dict(r, id=i) for i, r in enumerate(datainf_rows(["A", "B"]))])
    write_arrow_dir(tmp_path / "t_test.hf", [dict(r, id=1) for r in datainf_rows(["A"])])
    err = error_of(read_samples, tmp_path / "t")
    assert "duplicate id '1'" in str(err) and "t_train.hf, row 1" in str(err) and "t_test.hf, row 0" in str(err)


def test_datainf_text_not_starting_with_prompt(tmp_path):
    rows = datainf_rows(["A", "B"])
    rows[1]["text"] = "something else"
    write_arrow_dir(tmp_path / "t_train.hf", rows)
    write_arrow_dir(tmp_path / "t_test.hf", datainf_rows(["A"]))
    err = error_of(read_samples, tmp_path / "t")
    assert "t_train.hf, row 1" in str(err) and "'text' does not start with field 'prompt'" in str(err)


def test_datainf_prefix_half_missing(tmp_path):
    write_arrow_dir(tmp_path / "t_train.hf", datainf_rows(["A"]))
    err = error_of(read_samples, tmp_path / "t")
    assert "t_test.hf" in str(err) and "needs both" in str(err)


def test_split_conflicting_with_datainf_folder(tmp_path):
    write_arrow_dir(tmp_path / "t_train.hf", [dict(r, split="test") for r in datainf_rows(["A"])])
    write_arrow_dir(tmp_path / "t_test.hf", datainf_rows(["A"]))
    err = error_of(read_samples, tmp_path / "t")
    assert "t_train.hf, row 0" in str(err) and "train folder" in str(err)


def test_non_jsonable_meta(tmp_path):
    import datetime

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "response": "r", "when": datetime.date(2024, 1, 1)}]), path)
    err = error_of(read_samples, path)
    assert "row 0" in str(err) and "'when'" in str(err) and "JSON" in str(err)


# ------------------------------------------------------------------------------------------ eval sets


def test_load_eval_sets_single_file(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1]), dict(ROWS[0], split="valid")]
    valuation, training = load_eval_sets(write_lines(tmp_path / "d.jsonl", rows))
    assert [s.row for s in valuation] == [1, 2] and [s.row for s in training] == [0]


def test_load_eval_sets_missing_split(tmp_path):
    rows = [ROWS[0], ROWS[1], {k: v for k, v in ROWS[1].items() if k != "split"}]
    err = error_of(load_eval_sets, write_lines(tmp_path / "d.jsonl", rows))
    assert "row 2" in str(err) and "'split'" in str(err)


def test_load_eval_sets_missing_label(tmp_path):
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "label"}]
    err = error_of(load_eval_sets, write_lines(tmp_path / "d.jsonl", rows))
    assert "row 1" in str(err) and "'label'" in str(err)


def test_load_eval_sets_two_files(tmp_path):
    strip = lambda r: {k: v for k, v in r.items() if k != "split"}  # noqa: E731
    val = write_lines(tmp_path / "val.jsonl", [strip(ROWS[1])])
    train = write_lines(tmp_path / "train.jsonl", [strip(ROWS[0]), dict(ROWS[0], label="z")])
    valuation, training = load_eval_sets(val, train=train)
    assert [s.split for s in valuation] == ["test"] and [s.split for s in training] == ["train", "train"]
    assert [s.label for s in training] == ["x", "z"]


def test_load_eval_sets_two_files_conflicting_split(tmp_path):
    val = write_lines(tmp_path / "val.jsonl", [ROWS[0]])  # split train in the valuation file
    train = write_lines(tmp_path / "train.jsonl", [ROWS[0]])
    err = error_of(load_eval_sets, val, train=train)
    assert "val.jsonl, row 0" in str(err) and "valuation file" in str(err)


def test_load_eval_sets_datainf(tmp_path):
    valuation, training = load_eval_sets(make_datainf(tmp_path))
    assert [s.id for s in valuation] == ["test/0", "test/1"] and len(training) == 4
    assert [s.label for s in valuation] == ["A", "B"]
    err = error_of(load_eval_sets, tmp_path / "toy", train=tmp_path / "other.jsonl")
    assert "DataInf prefix" in str(err)


@pytest.mark.parametrize("split,side", [("train", "valuation"), ("test", "training")])
def test_load_eval_sets_empty_side(tmp_path, split, side):
    err = error_of(load_eval_sets, write_lines(tmp_path / "d.jsonl", [dict(ROWS[0], split=split)]))
    assert f"no {side} rows" in str(err) and "d.jsonl" in str(err)


# ------------------------------------------------------------------------------------------ writing


def test_write_jsonl_roundtrip_and_atomic(tmp_path):
    path = tmp_path / "out" / "d.jsonl"
    samples = read_samples(write_lines(tmp_path / "in.jsonl", ROWS))
    assert write_jsonl(path, samples) == 2
    again = read_samples(path)
    assert [(s.prompt, s.response, s.label, s.split, s.clean, s.meta) for s in again] == \
           [(s.prompt, s.response, s.label, s.split, s.clean, s.meta) for s in samples]
    assert [s.id for s in again] == [s.id for s in samples]

    def rows():
        yield {"ok": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert len(read_samples(path)) == 2  # the old file is untouched
    assert os.listdir(path.parent) == ["d.jsonl"]  # no temporary left behind
