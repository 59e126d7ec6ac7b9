"""Readers for the samples forvalue values: JSONL, Parquet, Arrow (`datasets` folders) and DataInf prefixes.

Every reader returns a list of `Sample` (prompt, response, optional label / split / clean flag, and the
row's other fields as `meta`). Rows are validated one by one; any problem raises a one-line `DataError`
naming the file, the 0-based row and the field, and saying what to change.

Supported inputs of `read_samples`:

- `*.jsonl` / `*.json`: one JSON object per line (blank lines skipped; `row` is the 0-based *line* number,
  so an editor shows it as line row + 1). A `.json` file whose content starts with `[` is read as one
  JSON array of objects instead (`row` = index in the array).
- `*.parquet` / `*.pq`: read with pyarrow.
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

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields as dc_fields, replace
from pathlib import Path
from typing import Any

from forvalue.indexer.errors import DataError
from forvalue.indexer.files import write_atomic

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
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
        """What the forward pass takes: (prompt, response), or (prompt, response, vision.ImageRef) with an image."""
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
    return row


def sample_of_row(row: Mapping[str, Any]) -> Sample:
    """The Sample a stored row (`stored_row`) was made from."""
    return Sample(id=str(row["id"]), prompt=row["prompt"], response=row["response"], label=row.get("label"),
                  split=row.get("split"), clean=row.get("clean"), meta=dict(row.get("meta") or {}),
                  image=row.get("image"))


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
            raise ValueError(f"FieldMap maps several fields to the same column {dupes}; give each its own")


def read_samples(
    path: str | os.PathLike[str],
    fields: FieldMap = FieldMap(),
    require: Iterable[str] = ("prompt", "response"),
) -> list[Sample]:
    """Read and validate every row of a data file (format chosen by the path, see module docstring).

    Args:
        path: a .jsonl/.json, .parquet/.pq or .arrow file, a `datasets` folder, or a DataInf prefix.
        fields: column names of the Sample fields.
        require: Sample fields every row must have. prompt and response are always required; list
            label, split, clean or id to require them too.

    Returns:
        The samples in file order (for a DataInf prefix: train rows, then test rows).

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
    if prefix is not None:
        samples: list[Sample] = []
        for split, part in prefix:
            samples.extend(
                _parse_rows(_iter_rows(part), str(part), fields, required, split=split, id_prefix=f"{split}/")
            )
    else:
        samples = _parse_rows(_iter_rows(p), str(p), fields, required)
    if not samples:
        raise DataError("no rows found; the file is empty", path=str(p))
    _check_unique_ids(samples)
    return samples


def load_eval_sets(
    path: str | os.PathLike[str],
    train: str | os.PathLike[str] | None = None,
    fields: FieldMap = FieldMap(),
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
        valuation = _with_split(read_samples(p, fields, require=("label",)), "test")
        training = _with_split(read_samples(train, fields, require=("label",)), "train")
        where_val, where_train = str(p), str(train)
    else:
        samples = read_samples(p, fields, require=("label", "split"))
        valuation = [s for s in samples if s.split == "test"]
        training = [s for s in samples if s.split == "train"]
        where_val = where_train = str(p)
    if not valuation:
        raise DataError("no valuation rows (split test); add some or pass the valuation file", path=where_val)
    if not training:
        raise DataError("no training rows (split train); add some or pass train=...", path=where_train)
    return valuation, training


def load_valuation_set(path: str | os.PathLike[str], fields: FieldMap = FieldMap(),
                       require: Sequence[str] = (), split: str | None = None) -> list[Sample]:
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
        samples = _with_split(read_samples(dict(parts)[want], fields, require=tuple(require)), want)
    else:
        samples = read_samples(p, fields, require=tuple(require))
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
    supported = ", ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)
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


def _parse_rows(
    rows: Iterable[tuple[int, Any]],
    source: str,
    fields: FieldMap,
    required: set[str],
    split: str | None = None,
    id_prefix: str = "",
) -> list[Sample]:
    return [_parse_row(obj, row, source, fields, required, split, id_prefix) for row, obj in rows]


def _parse_row(
    obj: Any,
    row: int,
    source: str,
    fields: FieldMap,
    required: set[str],
    split: str | None,
    id_prefix: str,
) -> Sample:
    def fail(message: str) -> DataError:
        return DataError(message, path=source, row=row)

    if not isinstance(obj, dict):
        raise fail(f"row is a JSON {type(obj).__name__}, not an object; write one object per row")
    used = set()
    datainf = fields.response not in obj and DATAINF_TEXT in obj

    for name in sorted(required):
        column = getattr(fields, name)
        if name == "response" and datainf:
            continue
        if name == "label" and datainf and column not in obj:
            column = DATAINF_LABEL
        if obj.get(column) is None and not (name == "split" and split is not None):
            raise fail(f"missing required field {column!r}; add it to every row, or name the column that holds it "
                       f"with --{name}-field")

    prompt, response = _parse_texts(obj, fields, datainf, used, fail)

    label_column = fields.label
    if datainf and label_column not in obj and DATAINF_LABEL in obj:
        label_column = DATAINF_LABEL
    label = _parse_label(obj.get(label_column), label_column, fail)
    used.add(label_column)

    row_split = _parse_split(obj.get(fields.split), fields.split, fail)
    used.add(fields.split)
    if split is not None:
        if row_split is not None and row_split != split:
            raise fail(f"field {fields.split!r} is {obj[fields.split]!r} but the row is in the {split} folder; "
                       "remove the column or fix the value")
        row_split = split

    clean = _parse_clean(obj.get(fields.clean), fields.clean, fail)
    used.add(fields.clean)

    sample_id = _parse_id(obj.get(fields.id), fields.id, f"{id_prefix}{row}", fail)
    used.add(fields.id)

    image = obj.get(fields.image)
    used.add(fields.image)
    if image is not None:
        from .images import resolve_image_path

        try:
            image = resolve_image_path(image, source)
        except ValueError as exc:
            raise fail(f"field {fields.image!r} {exc}") from exc

    meta = _parse_meta(obj, used, fail)
    return Sample(id=sample_id, prompt=prompt, response=response, label=label, split=row_split, clean=clean,
                  meta=meta, row=row, source=source, image=image)


def _parse_texts(obj: dict, fields: FieldMap, datainf: bool, used: set, fail) -> tuple[str, str]:
    """(prompt, response) of a row: its prompt and response columns, or a DataInf row's text = prompt + response."""
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
        response_field = DATAINF_TEXT
    else:
        response = obj.get(fields.response)
        used.add(fields.response)
        response_field = fields.response
        if not isinstance(response, str):
            raise fail(f"field {fields.response!r} must be a string, got {type(response).__name__}")
    if not response.strip():
        raise fail(f"field {response_field!r} gives an empty or whitespace-only response; drop the row or fill it")
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
