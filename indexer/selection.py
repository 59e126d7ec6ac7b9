"""Data selection from a full valuation: rank every training row, pick the top (or bottom) rows, save the scores.

`rank_scores` turns the value of every training row to a valuation set, (n,), into an order, 1-based ranks
and percentiles; `parse_select` turns `--select 5%` or `--select 500` into a row count; `write_scores`
saves one row per training sample (id, row, score, rank, percentile, selected) as JSONL or Parquet.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np

from .files import write_atomic
from .errors import ConfigError

SCORE_SUFFIXES = (".jsonl", ".parquet")
SCORE_COLUMNS = ("id", "row", "score", "rank", "percentile", "selected")

_PERCENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)%")
_COUNT = re.compile(r"\d+")
_SELECT_FORMS = "a percentage of the rows such as 5% (more than 0, at most 100) or a row count such as 500"


def parse_select(spec: str, n: int) -> int:
    """The number of rows `--select SPEC` picks out of n.

    Args:
        spec: "P%" (P% of n rows, 0 < P <= 100, rounded up, at least 1 when n > 0) or "K" (K rows, 1 <= K <= n).
        n: rows scored.

    Raises:
        ConfigError: the spec has neither form, P is out of range, or K is 0 or more than n.
    """
    text = spec.strip()
    if _PERCENT.fullmatch(text):
        p = Fraction(text[:-1])  # exact: 10% of 30 is 3 rows, not ceil(3.0000000000000004) = 4
        if not 0 < p <= 100:
            raise ConfigError(f"--select {spec!r}: the percentage must be more than 0 and at most 100")
        return int(-(-p * n // 100))  # ceil(p * n / 100): at least 1 row when n > 0
    if _COUNT.fullmatch(text):
        k = int(text)
        if k < 1:
            raise ConfigError(f"--select {spec!r}: select at least 1 row, or give {_SELECT_FORMS}")
        if k > n:
            raise ConfigError(f"--select {spec!r} asks for more rows than the {n} scored; give at most {n} "
                              "or a percentage such as 5%")
        return k
    raise ConfigError(f"--select {spec!r}: expected {_SELECT_FORMS}")


def rank_scores(ids: Sequence[str], scores: np.ndarray, lowest: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order, ranks and percentiles of n training rows by their value.

    Args:
        ids: the rows' ids (n,), in row order (checked against the scores' length).
        scores: (n,) finite values, row order.
        lowest: rank the lowest value first (noisy-data detection); default: the highest first.

    Returns:
        order (n,) int64: row numbers, best first (ties: lower row first);
        ranks (n,) int64: 1-based rank of each row, ranks[order[i]] = i + 1;
        percentiles (n,) float64: the fraction of the other n - 1 rows with a strictly lower score
            (0 for the lowest, 1 for the highest; 0 when n = 1), whatever the direction.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != len(ids):
        raise ValueError(f"rank_scores needs one score per id: {len(ids)} ids, scores of shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"rank_scores needs finite scores; row {int(np.flatnonzero(~np.isfinite(s))[0])} is not")
    n = s.shape[0]
    order = np.argsort(s if lowest else -s, kind="stable").astype(np.int64)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(1, n + 1)
    lower = np.searchsorted(np.sort(s), s, side="left")
    percentiles = lower / max(n - 1, 1)
    return order, ranks, percentiles.astype(np.float64)


def centre_by_label(values: np.ndarray, labels: Sequence[object]) -> np.ndarray:
    """`values` minus the mean of the values of the rows with the same label (`rank --per-label`: a row compared
    with the other rows of its class)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    for label in set(labels):
        at = np.array([i for i, x in enumerate(labels) if x == label])
        out[at] = values[at] - values[at].mean()
    return out


def scores_format(path: str | os.PathLike[str]) -> str:
    """"jsonl" or "parquet", by the extension of `path`.

    Raises:
        ConfigError: another extension (the message names --out and the accepted ones).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in SCORE_SUFFIXES:
        raise ConfigError(f"--out {str(path)!r}: unsupported extension {suffix or '(none)'!r}; use "
                          f"{' or '.join(SCORE_SUFFIXES)}")
    return suffix[1:]


def write_scores(path: str | os.PathLike[str], ids: Sequence[str], rows: Sequence[int] | np.ndarray,
                 scores: np.ndarray, ranks: np.ndarray, percentiles: np.ndarray, selected: np.ndarray) -> int:
    """Write one record per training row (columns SCORE_COLUMNS), in the order given, as .jsonl or .parquet.

    Atomic: a temporary file in the same folder, then `os.replace`; a failure leaves no partial file and an
    existing `path` untouched. Missing parent folders are created.

    Args:
        ids: (m,) training ids. rows: (m,) row numbers in the index version. scores: (m,) values.
        ranks: (m,) 1-based ranks. percentiles: (m,) in [0, 1]. selected: (m,) bool.

    Returns:
        The number of records written (m).

    Raises:
        ConfigError: `path` has an unsupported extension.
    """
    fmt = scores_format(path)
    m = len(ids)
    columns = {"row": np.asarray(rows, dtype=np.int64), "score": np.asarray(scores, dtype=np.float64),
               "rank": np.asarray(ranks, dtype=np.int64), "percentile": np.asarray(percentiles, dtype=np.float64),
               "selected": np.asarray(selected, dtype=bool)}
    for name, col in columns.items():
        if col.shape != (m,):
            raise ValueError(f"write_scores: {name} has shape {col.shape}, expected ({m},) like ids")

    if fmt == "jsonl":
        def write(fh: IO[bytes]) -> None:
            for i in range(m):
                record = {"id": ids[i], "row": int(columns["row"][i]), "score": float(columns["score"][i]),
                          "rank": int(columns["rank"][i]), "percentile": float(columns["percentile"][i]),
                          "selected": bool(columns["selected"][i])}
                fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def write(fh: IO[bytes]) -> None:
            table = pa.table({"id": pa.array(list(ids), type=pa.string()),
                              **{name: pa.array(col) for name, col in columns.items()}})
            pq.write_table(table, fh)

    write_atomic(path, write, make_parents=True)
    return m
