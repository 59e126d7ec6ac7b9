"""Readers for the samples forvalue values: JSONL, Parquet, Arrow (`datasets` folders) and DataInf prefixes.

Every reader returns a list of `Sample` (prompt, response, optional label / split / clean flag, and the
row's other fields as `meta`). Rows are validated one by one; any problem raises a one-line `DataError`
naming the file, the 0-based row and the field, and saying what to change.

Supported inputs of `read_samples`:

- `*.jsonl` / `*.json`: one JSON object per line (blank lines skipped; `row` is the 0-based *line* number,
  so an editor shows it as line row + 1). A `.json` file whose content starts with `[` is read as one
  JSON array of objects instead (`row` = index in the array).
- `*.parquet` / `*.pq`: read with pyarrow.
- `*.csv`: a header line, then one row per record (an empty cell is a missing value; a cell holding a JSON
  list or object, such as a `messages` column, is read as that value).
- `*.arrow`: one Arrow IPC file (stream format, as written by `datasets`, or file format).
- a directory (`X.hf`, as written by `datasets.Dataset.save_to_disk`) holding `data-*.arrow` shards, read
  in name order; `row` counts across shards.
- a DataInf prefix `DIR/NAME`: no such path, but `DIR/NAME_train.hf` and `DIR/NAME_test.hf` exist. Both are
  read, train rows first, with split set to "train" / "test".

DataInf rows have columns prompt, text, variation and no response column: the response is `text` minus
the `prompt` prefix with a trailing literal `</s>` dropped, the label is `variation`, and the remaining
columns (answer, reason) go to `meta`. `text` itself is not kept.

Ids: the `id` field when a row has one (converted to str), else the row number as a string ("0", "1",
...); rows of a DataInf prefix without ids get "train/0", "test/0", ... Ids must be unique within one
`read_samples` result.

Images (vision-language models): the `image` field holds the path of an image file (PNG, JPEG, WEBP, GIF,
BMP), relative to the data file's folder or absolute, or a `{"path": ...}` struct as `datasets` writes Image
columns; URLs and embedded bytes are refused. The reader checks the file exists, its size and its header
(`vision.resolve_image_path`); the pixels are decoded in the forward pass, whose errors name file and row too.

Split values: "train" and "test", case-insensitive; "val", "valid", "validation" and "eval" are accepted
as aliases of "test" (the valuation side). Clean flags: JSON booleans, 0/1, or the strings
"true"/"false"/"0"/"1".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields as dc_fields, replace
from pathlib import Path
from typing import Any

from forvalue.indexer.errors import DataError
from forvalue.indexer.files import write_atomic
from forvalue.indexer.formats import (
    Chat, Schema, flat_prompt, matches, messages_of, scored_turns, text_columns_unused,
)

log = logging.getLogger("forvalue.indexer.data")

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
CSV_SUFFIXES = (".csv",)
SPLITS = ("train", "test")
SPLIT_ALIASES = {
    "train": "train",
    "test": "test",
    "val": "test",
    "valid": "test",
    "validation": "test",
    "eval": "test",
}
SAMPLE_FIELDS = ("id", "prompt", "response", "label", "split", "clean", "image")
DATAINF_TEXT = "text"
DATAINF_LABEL = "variation"
DATAINF_EOS = "</s>"


@dataclass(frozen=True)
class Sample:
    """One sample to value: the prompt, the response whose value is measured, and bookkeeping.

    Attributes:
        id: unique id within its set (the row's `id` field, or the row number; see module docstring).
        prompt: the conditioning text (may be empty).
        response: the continuation that is scored; never empty or whitespace-only.
        label: class label used by the evaluation (same label = relevant training sample), if any.
        split: "train", "test" or None.
        clean: False for a deliberately corrupted training row, True for a clean one, None if unknown.
        meta: all other fields of the row (JSON-able values). Not part of equality or hashing.
        row: 0-based row in `source` (-1 when the sample was not read from a file).
        source: the file or directory it was read from ("" when not read from a file).
        image: the absolute path of the sample's image (for vision-language models), or None. The reader
            resolves relative paths from the data file's folder and checks the file (vision.resolve_image_path).
    """

    id: str
    prompt: str
    response: str
    label: str | None = None
    split: str | None = None
    clean: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    row: int = -1
    source: str = ""
    image: str | None = None
    chat: Chat | None = None
    raw: dict[str, Any] | None = field(default=None, compare=False)
    auto_id: bool = field(default=False, compare=False)

    def original(self) -> dict[str, Any]:
        """The row exactly as it was read (same columns, same nesting); `to_dict` for a sample not read from a file."""
        return dict(self.raw) if self.raw is not None else self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able row (id, prompt, response, label, split, clean, image, then meta); None fields left out."""
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "response": self.response}
        for name in ("label", "split", "clean", "image"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for key, value in self.meta.items():
            out.setdefault(key, value)
        return out

    def as_input(self) -> tuple:
        """What the forward pass takes: (prompt, response), (prompt, response, formats.Chat) for a conversation, or
        (prompt, response, vision.ImageRef) with an image."""
        if self.chat is not None:
            return (self.prompt, self.response, self.chat)
        if self.image is None:
            return (self.prompt, self.response)
        from .images import ImageRef

        return (self.prompt, self.response,
                ImageRef(path=self.image, source=self.source, row=self.row if self.row >= 0 else None))


def stored_row(s: Sample) -> dict[str, Any]:
    """The row an index stores for a training sample (its metadata): id, prompt, response, the bookkeeping
    fields that are set, the image's path and sha256 (never its pixels), and `meta` nested."""
    row: dict[str, Any] = {"id": s.id, "prompt": s.prompt, "response": s.response}
    for name in ("label", "clean", "split"):
        if getattr(s, name) is not None:
            row[name] = getattr(s, name)
    if s.image is not None:
        from .images import file_sha256

        row["image"] = s.image
        row["image_sha256"] = file_sha256(s.image)
    if s.meta:
        row["meta"] = s.meta
    if s.chat is not None:
        row["chat"] = s.chat.to_json()
    if s.raw is not None:
        row["raw"] = s.raw
    if s.auto_id:
        row["auto_id"] = True
    return row


def content_key(row: Mapping[str, Any], settings: str = "") -> str:
    """sha256 of what is scored of a stored row (`stored_row`: prompt and response, or the conversation alone,
    whose prompt and response only name it for people; the image's sha256) under `settings` (what else decides
    the features, e.g. `sync.scoring_settings`); equal keys give equal features."""
    chat = json.dumps(row["chat"], sort_keys=True) if row.get("chat") is not None else ""
    texts = ("", "") if chat else (row["prompt"], row["response"])
    h = hashlib.sha256()
    for part in (settings, *texts, chat, row.get("image_sha256") or ""):
        b = str(part).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def sample_of_row(row: Mapping[str, Any]) -> Sample:
    """The Sample a stored row (`stored_row`) was made from."""
    return Sample(id=str(row["id"]), prompt=row["prompt"], response=row["response"], label=row.get("label"),
                  split=row.get("split"), clean=row.get("clean"), meta=dict(row.get("meta") or {}),
                  image=row.get("image"), chat=Chat.from_json(row["chat"]) if row.get("chat") else None,
                  raw=row.get("raw"), auto_id=bool(row.get("auto_id")))


@dataclass(frozen=True)
class FieldMap:
    """Which column of a data file holds each Sample field. Change one with `dataclasses.replace`."""

    prompt: str = field(default="prompt", metadata={"help": "Column with the prompt text."})
    response: str = field(default="response", metadata={"help": "Column with the response text."})
    label: str = field(default="label", metadata={"help": "Column with the class label (str or int)."})
    split: str = field(default="split", metadata={"help": "Column with the split: train or test."})
    clean: str = field(default="clean", metadata={"help": "Column with the clean flag (bool or 0/1)."})
    id: str = field(default="id", metadata={"help": "Column with a unique row id (str or int)."})
    image: str = field(default="image", metadata={
        "help": "Column with the image file of the row (vision-language models), relative to the data file."})

    def __post_init__(self) -> None:
        names = [getattr(self, f.name) for f in dc_fields(self)]
        for f, name in zip(dc_fields(self), names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"FieldMap.{f.name} must be a non-empty column name, got {name!r}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            flags = ", ".join(f"--{f.name}-field" for f, n in zip(dc_fields(self), names) if n in dupes)
            raise ValueError(f"{flags} name the same column {dupes[0]!r}; give each field its own column")

    def changed(self) -> dict[str, str]:
        """The fields whose column is not the default one (what an index remembers)."""
        default = FieldMap()
        return {f.name: getattr(self, f.name) for f in dc_fields(self) if getattr(self, f.name) != getattr(default, f.name)}


def remembered(kept: Mapping[str, Any] | None, fields: FieldMap, given: Mapping[str, str | None],
               queries: bool = False) -> tuple[FieldMap, Schema]:
    """The field names and schema a command reads its file with: an index's (`kept`, its manifest's "data"),
    or, for a new index (kept None), the options given.

    Args:
        given: the options format, template and turns as given on the command line (None: not given).
        queries: for valuation files (query, rank, eval --index): any format is read (detected), and a flat
            row meets a conversational index as a conversation (template "chat").

    Raises:
        ConfigError: an option given contradicts what the index remembers.
    """
    from .errors import ConfigError

    if kept is None:
        schema = Schema(format=given.get("format") or "auto", template=given.get("template") or "plain",
                        turns=given.get("turns") or "all", fields=fields.changed())
        return fields, schema
    schema = Schema.from_json(kept)
    for name in ("format", "template", "turns"):
        value = given.get(name)
        if value is not None and value != getattr(schema, name):
            raise ConfigError(f"--{name} {value!r} differs from the index's {name} {getattr(schema, name)!r}, which "
                              f"it keeps from index build; leave --{name} out")
    mine = fields.changed()
    for name, column in mine.items():
        if schema.fields.get(name, column) != column:
            raise ConfigError(f"--{name}-field {column!r} differs from the index's {schema.fields[name]!r}, which it "
                              f"keeps from index build; leave --{name}-field out")
    fields = replace(fields, **{k: v for k, v in schema.fields.items() if k not in mine})
    if queries:
        template = "chat" if schema.format == "messages" else schema.template
        schema = replace(schema, format="auto", template=template)
    return fields, schema


def flat_sample(prompt: str, response: str, schema: Schema = Schema()) -> Sample:
    """A valuation sample given as texts (the --prompt/--response options), made as a row of `schema` is.

    Raises:
        DataError: the response is empty, or the template names a column other than {prompt}.
    """
    def fail(message: str) -> DataError:
        return DataError(message.replace("field 'response'", "--response"))

    obj = {"prompt": prompt, "response": response}
    prompt, response, chat = _flat(prompt, response, "response", obj, schema, fail)
    return Sample(id="query", prompt=prompt, response=response, chat=chat)


def read_samples(
    path: str | os.PathLike[str],
    fields: FieldMap = FieldMap(),
    require: Iterable[str] = ("prompt", "response"),
    schema: Schema = Schema(),
) -> list[Sample]:
    """Read and validate every row of a data file (see `read_corpus`, which also returns the schema found)."""
    return read_corpus(path, fields, require, schema)[0]


def read_corpus(
    path: str | os.PathLike[str],
    fields: FieldMap = FieldMap(),
    require: Iterable[str] = ("prompt", "response"),
    schema: Schema = Schema(),
) -> tuple[list[Sample], Schema]:
    """Read and validate every row of a data file (file type chosen by the path, see module docstring; the
    fine-tuning format detected from the first row unless `schema.format` names it, see formats.py).

    Rows without an id column get a content id (`content_id`); a row repeating an earlier row's content
    exactly is skipped (one warning line counts them).

    Args:
        path: a .jsonl/.json, .parquet/.pq or .arrow file, a `datasets` folder, or a DataInf prefix.
        fields: column names of the Sample fields.
        require: Sample fields every row must have. prompt and response are always required (as the
            format gives them); list label, split, clean or id to require them too.
        schema: the format, template and turn scope (an index's, for its later commands).

    Returns:
        (the samples in file order (for a DataInf prefix: train rows, then test rows), the schema with the
        format found).

    Raises:
        DataError: the path is missing or unreadable, or a row is invalid (message names file and row).
        ValueError: `require` names an unknown field.
    """
    required = set(require) | {"prompt", "response"}
    unknown = sorted(required - set(SAMPLE_FIELDS))
    if unknown:
        raise ValueError(f"require has unknown fields {unknown}; choose from {list(SAMPLE_FIELDS)}")
    p = Path(path)
    prefix = _datainf_parts(p)
    reader = _Reader(fields, required, schema)
    samples: list[Sample] = []
    if prefix is not None:
        for split, part in prefix:
            samples.extend(reader.rows(_iter_rows(part), str(part), split=split, id_prefix=f"{split}/"))
    else:
        samples = reader.rows(_iter_rows(p), str(p))
    if not samples:
        raise DataError("no rows found; the file is empty", path=str(p))
    reader.warn(str(p))
    _check_unique_ids(samples)
    return samples, replace(schema, format=reader.format or "prompt-response")


def content_id(obj: Mapping[str, Any]) -> str:
    """The id of a row without an id column: 16 hex digits of the sha256 of the row (every column, keys
    sorted), so it survives reordering of the file and repeats exactly when the row does."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_eval_sets(
    path: str | os.PathLike[str],
    train: str | os.PathLike[str] | None = None,
    fields: FieldMap = FieldMap(),
    schema: Schema = Schema(),
) -> tuple[list[Sample], list[Sample]]:
    """Load a labelled evaluation set as (valuation samples, training samples).

    Three layouts:

    - `path` alone, one file with a split column: split test rows are the valuation set, train rows the
      training set; every row needs a split value.
    - `path` = valuation file, `train` = training file: no split column needed (if present it must
      agree: "test" in the valuation file, "train" in the training file).
    - `path` = DataInf prefix (`DIR/NAME` with `NAME_train.hf` and `NAME_test.hf`).

    Every row needs a label. Returned samples carry split "test" (valuation) or "train" (training).

    Args:
        path: the combined file, the valuation file, or a DataInf prefix.
        train: the training file, when `path` holds only the valuation set.
        fields: column names of the Sample fields.

    Returns:
        (valuation, training), each non-empty, in file order.

    Raises:
        DataError: a row is invalid, a label or split is missing, or a side is empty.
    """
    p = Path(path)
    if train is not None:
        if _datainf_parts(p) is not None:
            raise DataError("a DataInf prefix holds both splits; do not pass a separate training file", path=str(p))
        valuation = _with_split(read_samples(p, fields, require=("label",), schema=schema), "test")
        training = _with_split(read_samples(train, fields, require=("label",), schema=schema), "train")
        where_val, where_train = str(p), str(train)
    else:
        samples = read_samples(p, fields, require=("label", "split"), schema=schema)
        valuation = [s for s in samples if s.split == "test"]
        training = [s for s in samples if s.split == "train"]
        where_val = where_train = str(p)
    if not valuation:
        raise DataError("no valuation rows (split test); add some or pass the valuation file", path=where_val)
    if not training:
        raise DataError("no training rows (split train); add some or pass train=...", path=where_train)
    return valuation, training


def load_valuation_set(path: str | os.PathLike[str], fields: FieldMap = FieldMap(),
                       require: Sequence[str] = (), schema: Schema = Schema(), split: str | None = None
                       ) -> list[Sample]:
    """The valuation rows of `path`: the test part of a DataInf prefix, the split test rows of a file with
    a split column, or every row of a file without one. `split` given: only the rows with that split value
    (any file; the CLI's --split).

    Raises:
        DataError: a row is invalid or no valuation row is left.
    """
    p = Path(path)
    parts = _datainf_parts(p)
    want = split or "test"
    if parts is not None and want in dict(parts):
        samples = _with_split(read_samples(dict(parts)[want], fields, require=tuple(require), schema=schema), want)
    else:
        samples = read_samples(p, fields, require=tuple(require), schema=schema)
        if split is not None or any(s.split is not None for s in samples):
            samples = [s for s in samples if s.split == want]
    if not samples:
        raise DataError(f"no valuation rows (split {want})", path=str(p))
    return samples


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any] | Sample]) -> int:
    """Write rows as JSONL atomically: a temporary file in the same folder, fsync, then `os.replace`.

    Readers never see a half-written file; on error the temporary file is removed and `path` is untouched.

    Args:
        path: the output file; missing parent folders are created.
        rows: JSON-able mappings, or Samples (written with `Sample.to_dict`).

    Returns:
        The number of rows written.
    """
    n = 0

    def write(fh) -> None:
        nonlocal n
        for row in rows:
            obj = row.to_dict() if isinstance(row, Sample) else dict(row)
            fh.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1

    write_atomic(path, write, make_parents=True)
    return n


# ---------------------------------------------------------------------------------------------- helpers


def _with_split(samples: list[Sample], split: str) -> list[Sample]:
    out = []
    for s in samples:
        if s.split is not None and s.split != split:
            side = "valuation" if split == "test" else "training"
            raise DataError(
                f"field split is {s.split!r} but this is the {side} file; remove the split column or fix the value",
                path=s.source, row=s.row,
            )
        out.append(replace(s, split=split))
    return out


def _datainf_parts(p: Path) -> list[tuple[str, Path]] | None:
    """[("train", NAME_train.hf), ("test", NAME_test.hf)] if `p` is a DataInf prefix, else None."""
    if p.exists():
        return None
    parts = [(split, p.with_name(f"{p.name}_{split}.hf")) for split in SPLITS]
    present = [part for _, part in parts if part.is_dir()]
    if not present:
        return None
    if len(present) == 1:
        missing = [str(part) for _, part in parts if not part.is_dir()][0]
        raise DataError(f"found {present[0]} but not {missing}; a DataInf prefix needs both", path=str(p))
    return parts


def _iter_rows(p: Path) -> Iterator[tuple[int, Any]]:
    """(row, raw row) pairs of one file or `datasets` folder; rows are not yet checked to be objects."""
    if p.is_dir():
        return _iter_arrow_dir(p)
    if not p.exists():
        raise DataError("no such file or directory; check the path", path=str(p))
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _iter_json(p)
    if suffix in PARQUET_SUFFIXES:
        return _iter_table(_read_parquet(p))
    if suffix in ARROW_SUFFIXES:
        return _iter_table(_read_arrow(p, p))
    if suffix in CSV_SUFFIXES:
        return _iter_csv(p)
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES + CSV_SUFFIXES)
    raise DataError(
        f"unsupported file type {suffix or '(no extension)'!r}; use {supported}, a datasets folder "
        "or a DataInf prefix",
        path=str(p),
    )


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start}); re-encode it as UTF-8",
                        path=str(p)) from exc
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror or exc}); check it exists and is readable",
                        path=str(p)) from exc


def _iter_json(p: Path) -> Iterator[tuple[int, Any]]:
    text = _read_text(p)
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON array ({exc.msg} at line {exc.lineno}); fix the file",
                            path=str(p)) from exc
        yield from enumerate(array)
        return
    # lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085, ..., which JSON strings hold raw
    for row, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object",
                            path=str(p), row=row) from exc
        yield row, obj


def _iter_csv(p: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV file with a header line; `row` counts data rows from 0. An empty cell is a missing value,
    and a cell holding a JSON list or object (a `messages` column) is read as that value."""
    import csv
    import io

    reader = csv.DictReader(io.StringIO(_read_text(p), newline=""))
    try:
        for row, obj in enumerate(reader):
            if None in obj:
                raise DataError(f"row has {len(reader.fieldnames or []) + len(obj[None])} cells but the header names "
                                f"{len(reader.fieldnames or [])}; quote cells that hold commas", path=str(p), row=row)
            yield row, {k: _csv_cell(v) for k, v in obj.items()}
    except csv.Error as exc:
        raise DataError(f"invalid CSV ({exc}); check the quoting", path=str(p)) from exc


def _csv_cell(value: str | None) -> Any:
    if value is None or value == "":
        return None
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(p: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read as Parquet ({exc}); check the file is a valid Parquet file",
                        path=str(p)) from exc


def _read_arrow(p: Path, where: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(p), "r") as source:
            try:
                return ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read {p.name} as Arrow IPC ({exc}); check the file is not damaged",
                        path=str(where)) from exc


def _iter_arrow_dir(p: Path) -> Iterator[tuple[int, Any]]:
    shards = sorted(p.glob("data-*.arrow"))
    if not shards:
        raise DataError("no data-*.arrow file in this directory; expected a datasets save_to_disk folder",
                        path=str(p))
    offset = 0
    for shard in shards:
        n = 0
        for row, obj in _iter_table(_read_arrow(shard, p)):
            yield offset + row, obj
            n = row + 1
        offset += n


def _iter_table(table) -> Iterator[tuple[int, Any]]:
    row = 0
    for batch in table.to_batches():
        for obj in batch.to_pylist():
            yield row, obj
            row += 1


class _Reader:
    """Parses the rows of one corpus: the format (the first row's, or the schema's), content ids, duplicates
    skipped, and what is worth one warning line (rows matching two formats, text columns no format reads)."""

    def __init__(self, fields: FieldMap, required: set[str], schema: Schema) -> None:
        self.fields, self.required, self.schema = fields, required, schema
        self.format: str | None = None if schema.format == "auto" else schema.format
        if self.format is None and (fields.prompt, fields.response) != ("prompt", "response"):
            self.format = "prompt-response"  # renamed prompt/response columns say which format it is
        self.ambiguous: list[tuple[int, list[str]]] = []
        self.unused: set[str] = set()
        self.duplicates: list[int] = []
        self.seen: set[str] = set()

    def rows(self, rows: Iterable[tuple[int, Any]], source: str, split: str | None = None,
             id_prefix: str = "") -> list[Sample]:
        out = []
        for row, obj in rows:
            sample = self.row(obj, row, source, split, id_prefix)
            if sample is not None:
                out.append(sample)
        return out

    def row(self, obj: Any, row: int, source: str, split: str | None, id_prefix: str) -> Sample | None:
        def fail(message: str) -> DataError:
            return DataError(message, path=source, row=row)

        if not isinstance(obj, dict):
            raise fail(f"row is a JSON {type(obj).__name__}, not an object; write one object per row")
        found = matches(obj, self.fields.prompt, self.fields.response)
        if self.format is None:
            if not found:
                raise fail("no fine-tuning format found: give messages, prompt + completion, instruction + output, "
                           "or prompt + response columns (or name yours with --prompt-field/--response-field)")
            self.format = found[0]
        if len(found) > 1:
            self.ambiguous.append((row, found))
        sample = _parse_row(obj, row, source, self.fields, self.required, split, id_prefix, self.format,
                            self.schema, fail)
        read = _bookkeeping(self.fields)
        if self.format == "prompt-response":
            read |= {self.fields.prompt, self.fields.response, DATAINF_TEXT}
        self.unused.update(text_columns_unused(obj, self.format, read))
        if sample.auto_id:
            if sample.id in self.seen:
                self.duplicates.append(row)
                return None
            self.seen.add(sample.id)
        return sample

    def warn(self, path: str) -> None:
        if self.ambiguous:
            row, found = self.ambiguous[0]
            log.warning("%s: %d row(s) match several formats (row %d: %s); read as %s (--format to choose)", path,
                        len(self.ambiguous), row, " and ".join(found), self.format)
        if self.unused:
            log.warning("%s: column(s) %s hold text that the %s format does not read; kept with the rows", path,
                        ", ".join(sorted(self.unused)), self.format)
        if self.duplicates:
            log.warning("%s: skipped %d row(s) repeating an earlier row exactly (first: row %d)", path,
                        len(self.duplicates), self.duplicates[0])


def _bookkeeping(fields: FieldMap) -> set[str]:
    return {fields.id, fields.label, fields.split, fields.clean, fields.image}


def _parse_row(obj: dict, row: int, source: str, fields: FieldMap, required: set[str], split: str | None,
               id_prefix: str, fmt: str, schema: Schema, fail) -> Sample:
    used: set[str] = set()
    for name in sorted(required - {"prompt", "response"}):
        column = getattr(fields, name)
        if name == "label" and column not in obj and DATAINF_TEXT in obj and fmt == "prompt-response":
            column = DATAINF_LABEL
        if obj.get(column) is None and not (name == "split" and split is not None):
            raise fail(f"missing required field {column!r}; add it to every row, or name the column that holds it "
                       f"with --{name}-field")
    prompt, response, chat = _parse_texts(obj, fmt, fields, schema, used, fail)
    datainf = DATAINF_TEXT in used
    label_column = fields.label
    if datainf and label_column not in obj and DATAINF_LABEL in obj:
        label_column = DATAINF_LABEL
    label = _parse_label(obj.get(label_column), label_column, fail)
    row_split = _parse_split(obj.get(fields.split), fields.split, fail)
    if split is not None:
        if row_split is not None and row_split != split:
            raise fail(f"field {fields.split!r} is {obj[fields.split]!r} but the row is in the {split} folder; "
                       "remove the column or fix the value")
        row_split = split
    clean = _parse_clean(obj.get(fields.clean), fields.clean, fail)
    raw_id = obj.get(fields.id)
    auto_id = raw_id is None and not id_prefix
    default_id = content_id(obj) if auto_id else f"{id_prefix}{row}"
    sample_id = _parse_id(raw_id, fields.id, default_id, fail)
    image = obj.get(fields.image)
    if image is not None:
        if chat is not None:
            raise fail(f"field {fields.image!r}: conversations with images are not read yet; give the row as "
                       "prompt + response with its image")
        from .images import resolve_image_path

        try:
            image = resolve_image_path(image, source)
        except ValueError as exc:
            raise fail(f"field {fields.image!r} {exc}") from exc
    used.update((label_column, fields.split, fields.clean, fields.id, fields.image))
    meta = _parse_meta(obj, used, fail)
    return Sample(id=sample_id, prompt=prompt, response=response, label=label, split=row_split, clean=clean,
                  meta=meta, row=row, source=source, image=image, chat=chat, raw=dict(obj) if not id_prefix else None,
                  auto_id=auto_id)


def _parse_texts(obj: dict, fmt: str, fields: FieldMap, schema: Schema, used: set,
                 fail) -> tuple[str, str, Chat | None]:
    """(prompt, response, conversation or None) of a row in format `fmt` (formats.py), under the schema's
    template and turn scope."""
    if fmt == "messages":
        column = "messages" if obj.get("messages") is not None else "conversations"
        used.add(column)
        if obj.get(column) is None:
            raise fail("missing field 'messages'; every row of a conversational file needs its messages")
        try:
            msgs = messages_of(obj[column], column)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        return _chat_sample(msgs, 0, schema.turns, column, fail)
    if fmt == "prompt-completion":
        used.update(("prompt", "completion"))
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if prompt is None or completion is None:
            raise fail("missing field 'prompt' or 'completion'; every row of a prompt-completion file needs both")
        if isinstance(prompt, list) or isinstance(completion, list):
            try:
                p = messages_of(prompt, "prompt") if isinstance(prompt, list) else (("user", _text(prompt, "prompt",
                                                                                                   fail)),)
                c = (messages_of(completion, "completion") if isinstance(completion, list)
                     else (("assistant", _text(completion, "completion", fail)),))
            except ValueError as exc:
                raise fail(str(exc)) from exc
            return _chat_sample(p + c, len(p), schema.turns, "completion", fail)
        prompt, response = _text(prompt, "prompt", fail), _text(completion, "completion", fail)
        return _flat(prompt, response, "completion", obj, schema, fail)
    if fmt == "instruction":
        used.update(("instruction", "input", "output"))
        instruction = _text(obj.get("instruction"), "instruction", fail)
        extra = obj.get("input")
        extra = "" if extra is None else _text(extra, "input", fail)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _flat(prompt, _text(obj.get("output"), "output", fail), "output", obj, schema, fail)
    prompt, response = _prompt_response(obj, fields, used, fail)
    return _flat(prompt, response, DATAINF_TEXT if DATAINF_TEXT in used else fields.response, obj, schema, fail)


def _text(value: Any, column: str, fail) -> str:
    if value is None:
        raise fail(f"missing required field {column!r}; add it to every row")
    if not isinstance(value, str):
        raise fail(f"field {column!r} must be a string, got {type(value).__name__}")
    return value


def _chat_sample(msgs, first: int, turns: str, column: str, fail) -> tuple[str, str, Chat]:
    chat = Chat(msgs, scored_turns(msgs, first, turns))
    try:
        chat.check()
    except ValueError as exc:
        raise fail(f"field {column!r}: {exc}; every conversation needs an assistant turn with text") from exc
    prompt, response = chat.display()
    return prompt, response, chat


def _flat(prompt: str, response: str, column: str, obj: dict, schema: Schema, fail) -> tuple[str, str, Chat | None]:
    if not response.strip():
        raise fail(f"field {column!r} gives an empty or whitespace-only response; drop the row or fill it")
    if schema.template == "chat":
        msgs = ((("user", prompt),) if prompt else ()) + (("assistant", response),)
        return prompt, response, Chat(msgs, (len(msgs) - 1,))
    try:
        return flat_prompt(schema.template, prompt, obj), response, None
    except ValueError as exc:
        raise fail(str(exc)) from exc


def _prompt_response(obj: dict, fields: FieldMap, used: set, fail) -> tuple[str, str]:
    """(prompt, response) of a row: its prompt and response columns, or a DataInf row's text = prompt + response."""
    datainf = fields.response not in obj and DATAINF_TEXT in obj
    for column in (fields.prompt,) + (() if datainf else (fields.response,)):
        if obj.get(column) is None:
            raise fail(f"missing required field {column!r}; add it to every row, or name the column that holds it "
                       f"with --{'prompt' if column == fields.prompt else 'response'}-field")
    prompt = obj.get(fields.prompt)
    used.add(fields.prompt)
    if not isinstance(prompt, str):
        raise fail(f"field {fields.prompt!r} must be a string, got {type(prompt).__name__}")
    if datainf:
        text = obj[DATAINF_TEXT]
        used.add(DATAINF_TEXT)
        if not isinstance(text, str):
            raise fail(f"field {DATAINF_TEXT!r} must be a string, got {type(text).__name__}")
        if not text.startswith(prompt):
            raise fail(f"field {DATAINF_TEXT!r} does not start with field {fields.prompt!r}; "
                       "DataInf rows need text = prompt + response")
        response = text[len(prompt):]
        if response.endswith(DATAINF_EOS):
            response = response[: -len(DATAINF_EOS)]
        return prompt, response
    response = obj.get(fields.response)
    used.add(fields.response)
    if not isinstance(response, str):
        raise fail(f"field {fields.response!r} must be a string, got {type(response).__name__}")
    return prompt, response


def _parse_id(raw_id: Any, column: str, default: str, fail) -> str:
    """The row's id: its id column as text, or `default` (the row number with a prefix) when it has none."""
    if raw_id is None:
        return default
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise fail(f"field {column!r} must be a string or an integer, got {type(raw_id).__name__}")
    if not str(raw_id).strip():
        raise fail(f"field {column!r} is empty; give every row a non-empty id or drop the column")
    return str(raw_id)


def _parse_meta(obj: dict, used: set, fail) -> dict[str, Any]:
    """Every column of the row that no field took, checked to be JSON-able."""
    meta = {}
    for key, value in obj.items():
        if key in used:
            continue
        if not _jsonable(value):
            raise fail(f"field {key!r} holds a {type(value).__name__}, which is not JSON-able; "
                       "convert it to a string or drop the column")
        meta[key] = value
    return meta


def _parse_label(value: Any, column: str, fail) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail(f"field {column!r} must be a string or an integer label, got {type(value).__name__}")
    label = str(value)
    if not label.strip():
        raise fail(f"field {column!r} is empty; give a class name or drop the field")
    return label


def _parse_split(value: Any, column: str, fail) -> str | None:
    if value is None:
        return None
    split = SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        raise fail(f"field {column!r} has unknown split {value!r}; use train or test "
                   f"(aliases of test: val, valid, validation, eval)")
    return split


def _parse_clean(value: Any, column: str, fail) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
        return value.strip().lower() in ("true", "1")
    raise fail(f"field {column!r} must be a boolean (true/false or 0/1), got {value!r}")


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _check_unique_ids(samples: list[Sample]) -> None:
    seen: dict[str, Sample] = {}
    for s in samples:
        first = seen.setdefault(s.id, s)
        if first is not s:
            where = f"row {first.row}" if first.source == s.source else f"{first.source}, row {first.row}"
            raise DataError(f"duplicate id {s.id!r}, already used by {where}; ids must be unique",
                            path=s.source, row=s.row)
