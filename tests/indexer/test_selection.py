"""indexer/selection.py against simple reference code: --select counts, ranks and percentiles, score files."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pyarrow.parquet as pq
import pytest

from forvalue.indexer.errors import ConfigError
from forvalue.indexer.selection import SCORE_COLUMNS, parse_select, rank_scores, scores_format, write_scores


def _ref_select(spec: str, n: int) -> int:
    """The smallest k with k / n >= p / 100 (at least 1), or the count itself."""
    if spec.endswith("%"):
        p = Fraction(spec[:-1])
        return max(next(k for k in range(n + 1) if 100 * k >= p * n), 1)
    return int(spec)


@pytest.mark.parametrize("spec,n", [
    ("5%", 36), ("10%", 30), ("10%", 36), ("33.3%", 10), ("0.1%", 36), ("100%", 7), ("50%", 1), ("12.5%", 8),
    ("7%", 100), ("3", 36), ("36", 36), ("1", 1),
])
def test_parse_select_matches_reference(spec, n):
    assert parse_select(spec, n) == _ref_select(spec, n)


def test_parse_select_is_exact_where_floats_round_up():
    # 10 * 30 / 100 is 3.0000000000000004 in floating point; ceil of it would select 4 rows
    assert parse_select("10%", 30) == 3 and parse_select("70%", 10) == 7


@pytest.mark.parametrize("spec", ["0%", "0.0%", "150%", "100.5%", "abc", "", "%", "5 %", "-5%", "0", "-3", "2.5",
                                  "1e2", "37", "nan%"])
def test_parse_select_rejects_with_the_option_name(spec):
    with pytest.raises(ConfigError, match="--select"):
        parse_select(spec, 36)


def _ref_rank(scores, lowest):
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i] if lowest else -scores[i], i))
    ranks = [order.index(i) + 1 for i in range(n)]
    pct = [sum(scores[j] < scores[i] for j in range(n)) / max(n - 1, 1) for i in range(n)]
    return order, ranks, pct


@pytest.mark.parametrize("lowest", [False, True])
@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (17, 2), (60, 3)])
def test_rank_scores_matches_brute_force(n, seed, lowest):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 4, size=n).astype(np.float64) * 0.5  # many ties
    ids = [f"r{i}" for i in range(n)]
    order, ranks, pct = rank_scores(ids, scores, lowest=lowest)
    ref_order, ref_ranks, ref_pct = _ref_rank(scores.tolist(), lowest)
    assert order.tolist() == ref_order
    assert ranks.tolist() == ref_ranks
    np.testing.assert_allclose(pct, ref_pct, rtol=0, atol=1e-12)


def test_rank_scores_percentiles_ignore_direction_and_span_zero_to_one():
    scores = np.array([0.3, -1.0, 2.0, 0.3])
    _, _, hi = rank_scores(list("abcd"), scores)
    _, _, lo = rank_scores(list("abcd"), scores, lowest=True)
    assert hi.tolist() == lo.tolist() == [1 / 3, 0.0, 1.0, 1 / 3]


@pytest.mark.parametrize("scores", [np.array([1.0, np.nan]), np.array([1.0, 2.0, 3.0])])
def test_rank_scores_rejects_nan_and_length_mismatch(scores):
    with pytest.raises(ValueError):
        rank_scores(["a", "b"], scores)


def _columns(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    ids = [f"id-{i}" for i in range(n)]
    order, ranks, pct = rank_scores(ids, scores)
    selected = ranks <= 3
    return [ids[i] for i in order], order, scores[order], ranks[order], pct[order], selected[order]


def _read(path):
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.parquet", "sub/dir/scores.parquet"])
def test_write_scores_round_trips(tmp_path, name):
    cols = _columns(9)
    path = tmp_path / name
    assert write_scores(path, *cols) == 9
    got = _read(path)
    expected = [dict(zip(SCORE_COLUMNS, (i, int(r), float(s), int(k), float(p), bool(sel))))
                for i, r, s, k, p, sel in zip(*cols)]
    assert got == expected  # floats exactly: JSON keeps repr, Parquet keeps float64
    assert [list(row) for row in got] == [list(SCORE_COLUMNS)] * 9
    assert list(tmp_path.rglob(".*.tmp")) == []


def test_jsonl_and_parquet_hold_the_same_records(tmp_path):
    cols = _columns(12, seed=5)
    write_scores(tmp_path / "a.jsonl", *cols)
    write_scores(tmp_path / "a.parquet", *cols)
    assert _read(tmp_path / "a.jsonl") == _read(tmp_path / "a.parquet")


@pytest.mark.parametrize("name", ["scores.csv", "scores", "scores.json", "scores.pq"])
def test_unsupported_extension_names_out(tmp_path, name):
    with pytest.raises(ConfigError, match=r"--out .*\.jsonl or \.parquet"):
        scores_format(name)
    with pytest.raises(ConfigError, match="--out"):
        write_scores(tmp_path / name, *_columns(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.parquet"])
def test_failed_write_leaves_the_existing_file_untouched(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"previous\n")
    ids, *rest = _columns(5)
    ids[3] = object()  # neither JSON nor Arrow can write this: the write fails part-way
    with pytest.raises((TypeError, ValueError)):
        write_scores(path, ids, *rest)
    assert path.read_bytes() == b"previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
