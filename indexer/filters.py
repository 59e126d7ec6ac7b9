"""Metadata filters (`Where`) and per-field value codes of an index version (`FieldIndex`).

A filter is a conjunction over fields of set membership: a training row matches when, for every field
named, its value is one of that field's values (`--where source=gsm8k --where source=mmlu --where
split=train`: source in {gsm8k, mmlu} and split = train). Fields are looked up among the stored row's
own keys (id, label, split, clean) and then among its other columns (`meta`); the free texts (prompt,
response) are not filterable.

Values compare by a canonical text: strings as they are, other JSON values as compact JSON with integral
floats written as integers (gRPC's Struct turns every number into a double). So `year=2024` matches the
stored int 2024 and the string "2024", `clean=true` matches the bool.

`FieldIndex` reads a version's metadata once per field (lazily, in blocks) into an int32 code per row;
a filter is then a vectorised membership test over n codes, never a pass over the re-rank store, and
group-by reads the same codes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

TEXT_FIELDS = ("prompt", "response")  # free text: never filtered or grouped on
MISSING = -1  # code of a row that lacks the field (matches no value)
_BLOCK = 65536  # metadata rows parsed per step when a field is first used


def value_key(value: Any) -> str:
    """The canonical text a value is compared by (see the module docstring)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def field_value(row: dict, field: str) -> tuple[bool, Any]:
    """(present, value) of `field` in a stored metadata row: its own keys first, then `meta`."""
    if field in row and field not in TEXT_FIELDS and field != "meta":
        return True, row[field]
    meta = row.get("meta")
    if isinstance(meta, dict) and field in meta:
        return True, meta[field]
    return False, None


def check_field(field: Any, what: str = "where") -> str:
    if not isinstance(field, str) or not field.strip():
        raise ConfigError(f"{what}: a field name must be a non-empty string, got {field!r}")
    if field in TEXT_FIELDS or field == "meta":
        raise ConfigError(f"{what}: {field!r} cannot be filtered or grouped on; use a metadata field "
                          "(e.g. source, dataset, license, split)")
    return field


@dataclass(frozen=True)
class Where:
    """A conjunction over fields of set membership.

    Attributes:
        terms: (field, value keys) pairs, one per field, sorted by field; value keys as `value_key` gives.
    """

    terms: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Any]]) -> Where:
        """From (field, value) pairs; a field given several times matches any of its values."""
        by_field: dict[str, set[str]] = {}
        for field, value in pairs:
            by_field.setdefault(check_field(field), set()).add(value_key(value))
        return cls(tuple((f, tuple(sorted(v))) for f, v in sorted(by_field.items())))

    @classmethod
    def parse(cls, items: Sequence[str]) -> Where:
        """From command-line items "FIELD=VALUE" (the value is everything after the first "=")."""
        pairs = []
        for item in items:
            field, sep, value = str(item).partition("=")
            if not sep or not field.strip():
                raise ConfigError(f"--where {item!r}: expected FIELD=VALUE, e.g. --where source=gsm8k")
            pairs.append((field.strip(), value))
        return cls.of(pairs)

    def __bool__(self) -> bool:
        return bool(self.terms)

    def matches(self, row: dict) -> bool:
        """Whether a stored metadata row matches (the per-row reference of `FieldIndex.rows`)."""
        for field, values in self.terms:
            present, value = field_value(row, field)
            if not present or value_key(value) not in values:
                return False
        return True

    def as_dict(self) -> dict[str, list[str]]:
        return {f: list(v) for f, v in self.terms}


class FieldIndex:
    """Value codes per row for the fields queried so far, read from a version's metadata on first use.

    Args:
        read_rows: global rows (k,) → their stored metadata dicts (e.g. `Version.rows`).
        n: rows of the version.
    """

    def __init__(self, read_rows: Callable[[np.ndarray], list[dict]], n: int):
        self._read = read_rows
        self.n = n
        self._codes: dict[str, tuple[np.ndarray, list[str]]] = {}
        self._lock = threading.Lock()

    def codes(self, field: str) -> tuple[np.ndarray, list[str]]:
        """(code per row (n,) int32, MISSING where absent; the value key of each code)."""
        check_field(field)
        with self._lock:
            got = self._codes.get(field)
            if got is None:
                got = self._codes[field] = self._scan(field)
        return got

    def _scan(self, field: str) -> tuple[np.ndarray, list[str]]:
        codes = np.full(self.n, MISSING, dtype=np.int32)
        keys: list[str] = []
        seen: dict[str, int] = {}
        for a in range(0, self.n, _BLOCK):
            for j, row in enumerate(self._read(np.arange(a, min(a + _BLOCK, self.n)))):
                present, value = field_value(row, field)
                if present:
                    key = value_key(value)
                    c = seen.get(key)
                    if c is None:
                        c = seen[key] = len(keys)
                        keys.append(key)
                    codes[a + j] = c
        if not keys and self.n:
            raise ConfigError(f"no training sample of this index has a field {field!r}; filter or group on a "
                              "field the data has (see `forvalue index info` or the data's columns)")
        return codes, keys

    def mask(self, where: Where) -> np.ndarray:
        """(n,) bool: the rows matching `where` (all rows for an empty filter)."""
        out = np.ones(self.n, dtype=bool)
        for field, values in where.terms:
            codes, keys = self.codes(field)
            chosen = set(values)
            wanted = [c for c, k in enumerate(keys) if k in chosen]
            out &= np.isin(codes, np.asarray(wanted, dtype=np.int32))
        return out

    def rows(self, where: Where) -> np.ndarray:
        """Sorted global rows matching `where` (int64)."""
        return np.flatnonzero(self.mask(where)).astype(np.int64)


def as_where(where: Where | Mapping[str, Any] | Sequence[str] | None) -> Where:
    """A Where from a Where, a mapping {field: value or list of values}, or "FIELD=VALUE" strings."""
    if where is None:
        return Where()
    if isinstance(where, Where):
        return where
    if isinstance(where, Mapping):
        pairs = []
        for field, values in where.items():
            for v in (values if isinstance(values, (list, tuple, set, frozenset)) else [values]):
                pairs.append((field, v))
        return Where.of(pairs)
    if isinstance(where, str):
        return Where.parse([where])
    return Where.parse(list(where))
