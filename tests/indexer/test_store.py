"""Tests of forvalue.indexer.store: round trips, resume after crashes (incl. kill -9), corruption, safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from forvalue.indexer import store
from forvalue.indexer.errors import ConfigError, DataError, IndexCorruptError, IndexMismatchError
from forvalue.indexer.files import check_safe_name
from forvalue.indexer.store import IndexRoot
from forvalue.indexer.store_format import FORMAT_VERSION, manifest_bytes

HERE = Path(__file__).resolve().parent
SKETCH_DIM = 8
H_DIM = 4


# ------------------------------------------------------------------------------------------- factories


def shard_data(seed: int, n: int, sketch_dim: int = SKETCH_DIM, h_dim: int = H_DIM, max_tokens: int = 6) -> dict:
    """A seeded shard: per-sample sketch, variable-length token arrays (some samples empty), unicode rows."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_tokens + 1, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tokens = int(offsets[-1])
    rows = [
        {"id": f"s{seed}-{j}", "prompt": f"Übersetze «Katze» → 猫 #{j}",
         "response": "🐱 line\nnext\u2028sep \"q\"", "extra": {"score": float(rng.random()), "tags": ["é", None, j]}}
        for j in range(n)
    ]
    return {
        "arrays": {"sketch": rng.standard_normal((n, sketch_dim)).astype(np.float32)},
        "token_arrays": {
            "h": rng.standard_normal((tokens, h_dim)).astype(np.float16),
            "y": rng.integers(0, 128, tokens).astype(np.int32),
            "lse": rng.standard_normal(tokens).astype(np.float32),
        },
        "offsets": offsets,
        "rows": rows,
    }


def write(build: store.Build, i: int, data: dict) -> None:
    build.write_shard(i, data["arrays"], data["rows"], token_arrays=data["token_arrays"], offsets=data["offsets"])


def build_version(root: IndexRoot, key: str, shards: list[dict], manifest: dict | None = None,
                  projection: np.ndarray | None = None) -> str:
    with root.open_build(key) as build:
        for i, data in enumerate(shards):
            write(build, i, data)
        build.put_array("projection.npy", np.arange(12, dtype=np.float32).reshape(3, 4) if projection is None
                        else projection)
        build.put_bytes("index.faiss", b"\x00fake faiss bytes\xff")
        build.put_json("sketch.json", {"dim": SKETCH_DIM, "seed": 7})
        return root.publish(build, manifest or {"model": "tiny", "seed": 7})


def concat(shards: list[dict]) -> dict:
    """The expected whole-index arrays and rows of a list of shards (the simple reference)."""
    out = {"sketch": np.concatenate([s["arrays"]["sketch"] for s in shards])}
    for name in ("h", "y", "lse"):
        out[name] = np.concatenate([s["token_arrays"][name] for s in shards])
    counts = np.concatenate([np.diff(s["offsets"]) for s in shards])
    out["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out["rows"] = [row for s in shards for row in s["rows"]]
    return out


def token_rows_loop(expected: dict, idx: list[int]) -> dict:
    """Reference gather: one sample at a time, in order."""
    o = expected["offsets"]
    out = {name: np.concatenate([expected[name][o[g]:o[g + 1]] for g in idx] or [expected[name][:0]])
           for name in ("h", "y", "lse")}
    out["offsets"] = np.concatenate([[0], np.cumsum([o[g + 1] - o[g] for g in idx])]).astype(np.int64)
    return out


def assert_version_equals(version: store.Version, expected: dict) -> None:
    assert version.n == len(expected["rows"])
    for name in ("sketch", "h", "y", "lse"):
        got = version.array(name)
        assert got.dtype == expected[name].dtype
        np.testing.assert_array_equal(got, expected[name])
    np.testing.assert_array_equal(version.offsets(), expected["offsets"])
    assert version.rows(range(version.n)) == expected["rows"]


def read_shard_dir(path: Path) -> dict:
    """Everything in a shard directory, read back without the store (to check it independently)."""
    out = {p.stem: np.load(p, allow_pickle=False) for p in path.glob("*.npy")}
    # Split on b"\n" only: rows may hold a raw U+2028, which str.splitlines would split on.
    lines = (path / "metadata.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    out["rows"] = [json.loads(line) for line in lines[:-1]]
    return out


def assert_shard_dir_equals(path: Path, data: dict) -> None:
    got = read_shard_dir(path)
    np.testing.assert_array_equal(got["sketch"], data["arrays"]["sketch"])
    for name, arr in data["token_arrays"].items():
        assert got[name].dtype == arr.dtype
        np.testing.assert_array_equal(got[name], arr)
    np.testing.assert_array_equal(got["offsets"], data["offsets"])
    assert got["rows"] == data["rows"]


@pytest.fixture
def shards3() -> list[dict]:
    return [shard_data(0, 6), shard_data(1, 1), shard_data(2, 9)]


# ---------------------------------------------------------------------------------------- round trip


def test_round_trip_and_second_publish(tmp_path, shards3):
    root = IndexRoot(tmp_path / "idx")
    assert root.current() is None and root.versions() == []
    name = build_version(root, "first", shards3, manifest={"model": "tiny", "seed": 7, "files": "ignored"})
    assert name == "v000001"
    assert (tmp_path / "idx" / "CURRENT").read_text() == "v000001\n"
    assert root.current() == "v000001"
    assert not (tmp_path / "idx" / "builds" / "first").exists()

    expected = concat(shards3)
    with root.load() as v1:
        assert v1.name == "v000001"
        assert_version_equals(v1, expected)
        assert v1.manifest["model"] == "tiny" and v1.manifest["format_version"] == FORMAT_VERSION
        assert v1.manifest["build_key"] == "first" and isinstance(v1.manifest["files"], dict)
        assert [s["rows"] for s in v1.manifest["shards"]] == [6, 1, 9]
        assert [len(m) for m in v1.shard_arrays("sketch")] == [6, 1, 9]
        assert isinstance(v1.shard_arrays("h")[0], np.memmap)

        rng = np.random.default_rng(5)
        idx = rng.integers(0, v1.n, 25).tolist() + [15, 0, 15]  # any order, repeats
        got = v1.token_rows(idx)
        ref = token_rows_loop(expected, idx)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype
            np.testing.assert_array_equal(got[key], ref[key])
        np.testing.assert_array_equal(v1.take("sketch", idx), expected["sketch"][idx])
        assert v1.rows(idx) == [expected["rows"][g] for g in idx]
        shard, local = v1.locate([0, 5, 6, 7, 15])
        assert shard.tolist() == [0, 0, 1, 2, 2] and local.tolist() == [0, 5, 0, 0, 8]

        empty = v1.token_rows([])
        assert empty["h"].shape == (0, H_DIM) and empty["h"].dtype == np.float16
        assert empty["offsets"].tolist() == [0]
        assert v1.rows([]) == []

        np.testing.assert_array_equal(v1.global_array("projection.npy"), np.arange(12).reshape(3, 4))
        assert v1.global_file("index.faiss").read_bytes() == b"\x00fake faiss bytes\xff"
        assert v1.global_json("sketch.json") == {"dim": SKETCH_DIM, "seed": 7}
        with pytest.raises(IndexMismatchError, match="no file"):
            v1.global_file("missing.bin")
        with pytest.raises(IndexMismatchError, match="no array"):
            v1.shard_arrays("nope")
        with pytest.raises(DataError, match="out of range"):
            v1.rows([16])
        with pytest.raises(DataError, match="out of range"):
            v1.token_rows([-1])

    more = [shard_data(10, 3), shard_data(11, 4)]
    assert root.next_version_name() == "v000002"
    assert build_version(root, "second", more) == "v000002"
    assert root.current() == "v000002" and root.versions() == ["v000001", "v000002"]
    assert (tmp_path / "idx" / "CURRENT").read_text() == "v000002\n"
    with root.load() as v2:
        assert_version_equals(v2, concat(more))
    with root.load("v000001") as old:  # the old version stays loadable and unchanged
        assert_version_equals(old, expected)


def test_empty_shard_and_no_token_arrays(tmp_path):
    root = IndexRoot(tmp_path)
    with root.open_build("plain") as build:
        build.write_shard(0, {"sketch": np.ones((2, 3), np.float32)}, [{"id": "a"}, {"id": "b"}])
        build.write_shard(1, {"sketch": np.ones((0, 3), np.float32)}, [])
        build.write_shard(2, {"sketch": np.zeros((1, 3), np.float32)}, [{"id": "c"}])
        root.publish(build, {})
    with root.load() as v:
        assert v.n == 3 and v.shard_rows.tolist() == [2, 0, 1]
        assert v.rows([2, 0]) == [{"id": "c"}, {"id": "a"}]
        np.testing.assert_array_equal(v.take("sketch", [2, 1]), [[0, 0, 0], [1, 1, 1]])
        with pytest.raises(IndexMismatchError, match="per-token"):
            v.token_rows([0])


def test_rewriting_a_done_shard_replaces_it(tmp_path):
    root = IndexRoot(tmp_path)
    with root.open_build("b") as build:
        write(build, 0, shard_data(0, 4))
        write(build, 0, shard_data(1, 2))
        assert build.done_shards() == [0]
        assert [p.name for p in (build.path / "shards").iterdir()] == ["000000"]
        root.publish(build, {})
    with root.load() as v:
        assert_version_equals(v, concat([shard_data(1, 2)]))


def test_build_reads_back_what_it_wrote(tmp_path):
    root = IndexRoot(tmp_path)
    data = shard_data(3, 5)
    with root.open_build("b") as build:
        write(build, 0, data)
        build.put_array("projection.npy", np.eye(3, dtype=np.float32))
        build.put_json("maps.json", {"buckets": 16, "name": "ü"})
    with root.open_build("b") as build:  # e.g. resuming: reuse what is there
        assert build.has_file("projection.npy") and not build.has_file("index.faiss")
        np.testing.assert_array_equal(build.read_array("projection.npy"), np.eye(3))
        assert build.read_json("maps.json") == {"buckets": 16, "name": "ü"}
        np.testing.assert_array_equal(build.read_shard_array(0, "sketch"), data["arrays"]["sketch"])
        np.testing.assert_array_equal(build.read_shard_array(0, "h"), data["token_arrays"]["h"])
        np.testing.assert_array_equal(build.read_shard_array(0, "offsets"), data["offsets"])
        info = build.shard_info(0)
        assert info["rows"] == 5 and info["tokens"] == int(data["offsets"][-1])
        assert info["arrays"]["h"] == {"kind": "token", "dtype": "<f2", "shape": [info["tokens"], H_DIM]}
        with pytest.raises(ConfigError, match="not done"):
            build.read_shard_array(1, "sketch")
        with pytest.raises(ConfigError, match="no array"):
            build.read_shard_array(0, "rowindex")


# -------------------------------------------------------------------------------------------- resume


def test_resume_after_crash_equals_uninterrupted(tmp_path, shards3):
    clean = IndexRoot(tmp_path / "clean")
    build_version(clean, "k", shards3)

    root = IndexRoot(tmp_path / "crashed")
    with root.open_build("k") as build:
        write(build, 0, shards3[0])
        write(build, 1, shards3[1])
        shards = build.path / "shards"
        # A crash in the middle of shard 2: its tmp dir, plus a renamed-looking dir without _DONE.json.
        (shards / ".tmp-000002-4242").mkdir()
        (shards / ".tmp-000002-4242" / "sketch.npy").write_bytes(b"partial")
        (shards / "000002").mkdir()
        np.save(shards / "000002" / "sketch.npy", shards3[2]["arrays"]["sketch"])
        (build.path / ".tmp-projection.npy-4242").write_bytes(b"half")
        (build.path / "manifest.json").write_text("{}")  # killed during publish
    with root.open_build("k") as build:
        assert build.done_shards() == [0, 1]
        assert build.shard_done(1) and not build.shard_done(2)
        assert sorted(p.name for p in (build.path / "shards").iterdir()) == ["000000", "000001"]
        assert sorted(p.name for p in build.path.iterdir()) == ["shards"]
        write(build, 2, shards3[2])
        build.put_array("projection.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
        build.put_bytes("index.faiss", b"\x00fake faiss bytes\xff")
        build.put_json("sketch.json", {"dim": SKETCH_DIM, "seed": 7})
        root.publish(build, {"model": "tiny", "seed": 7})

    with root.load() as got, clean.load() as want:
        assert_version_equals(got, concat(shards3))
        for name in ("sketch", "h", "y", "lse"):
            np.testing.assert_array_equal(got.array(name), want.array(name))
        assert got.rows(range(got.n)) == want.rows(range(want.n))
        assert got.manifest["files"] == want.manifest["files"]  # byte-identical files


def _break_missing_done(d: Path) -> None:
    (d / "_DONE.json").unlink()


def _break_done_json(d: Path) -> None:
    (d / "_DONE.json").write_text('{"rows": 3, "tok')


def _break_size(d: Path) -> None:
    with open(d / "h.npy", "ab") as f:
        f.write(b"x")


def _break_checksum(d: Path) -> None:
    data = bytearray((d / "metadata.jsonl").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "metadata.jsonl").write_bytes(bytes(data))


def _break_extra_file(d: Path) -> None:
    (d / "stray.npy").write_bytes(b"")


def _break_missing_file(d: Path) -> None:
    (d / "rowindex.npy").unlink()


@pytest.mark.parametrize("breaker", [_break_missing_done, _break_done_json, _break_size, _break_checksum,
                                     _break_extra_file, _break_missing_file])
def test_open_build_drops_incomplete_shards(tmp_path, breaker):
    root = IndexRoot(tmp_path)
    with root.open_build("b") as build:
        for i in range(3):
            write(build, i, shard_data(i, 4))
        breaker(build.path / "shards" / "000001")
    with root.open_build("b") as build:
        assert build.done_shards() == [0, 2]
        assert not (build.path / "shards" / "000001").exists()
        with pytest.raises(DataError, match=r"shards \[1\] are missing"):
            root.publish(build, {})


def test_open_build_without_verify_skips_checksums(tmp_path):
    root = IndexRoot(tmp_path)
    with root.open_build("b") as build:
        write(build, 0, shard_data(0, 4))
        _break_checksum(build.path / "shards" / "000000")
    with root.open_build("b", verify=False) as build:
        assert build.done_shards() == [0]  # sizes match; only a checksum would tell
        with pytest.raises(IndexCorruptError, match="shards/000000/metadata.jsonl"):
            root.publish(build, {})  # publish re-hashes against _DONE.json
    with root.open_build("b") as build:
        assert build.done_shards() == []


# ----------------------------------------------------------------------------------------- corruption


def _flip(path: Path, pos: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if pos is None else pos] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\n")


@pytest.fixture
def two_versions(tmp_path) -> IndexRoot:
    root = IndexRoot(tmp_path / "idx")
    build_version(root, "a", [shard_data(0, 3), shard_data(1, 2)])
    build_version(root, "b", [shard_data(2, 4), shard_data(3, 5)])
    return root


@pytest.mark.parametrize("corrupt", [_flip, _truncate, _append])
def test_every_corrupted_file_is_named(two_versions, corrupt):
    root = two_versions
    vdir = root.version_dir("v000002")
    rels = sorted(root.load("v000002").manifest["files"]) + ["manifest.json"]
    assert {"shards/000001/h.npy", "shards/000000/metadata.jsonl", "shards/000000/rowindex.npy",
            "shards/000000/offsets.npy", "shards/000000/_DONE.json", "index.faiss", "projection.npy"} <= set(rels)
    for rel in rels:
        path = vdir / rel
        original = path.read_bytes()
        corrupt(path)
        with pytest.raises(IndexCorruptError) as info:
            root.load("v000002", verify=True)
        assert f"versions/v000002/{rel}" in str(info.value)
        path.write_bytes(original)
        with root.load("v000001", verify=True) as other:
            assert other.n == 5
    with root.load("v000002", verify=True) as v:  # restored
        assert v.n == 9


def test_any_byte_of_the_manifest_is_checked(two_versions):
    root = two_versions
    path = root.version_dir("v000002") / "manifest.json"
    original = path.read_bytes()
    for pos in range(0, len(original), max(1, len(original) // 40)):
        for xor in (0x01, 0x20):
            data = bytearray(original)
            data[pos] ^= xor
            path.write_bytes(bytes(data))
            with pytest.raises(IndexCorruptError, match="versions/v000002/manifest.json"):
                root.load("v000002", verify=False)
    path.write_bytes(original)
    root.load("v000002").close()


def test_manifest_errors_say_what_is_wrong(two_versions):
    root = two_versions
    path = root.version_dir("v000002") / "manifest.json"
    body = json.loads(path.read_bytes())

    path.write_bytes(b"\x00not json")
    with pytest.raises(IndexCorruptError, match="not valid JSON"):
        root.load("v000002")
    path.write_bytes(manifest_bytes({**body, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(IndexCorruptError, match="format_version 2 is not supported"):
        root.load("v000002")
    path.unlink()
    with pytest.raises(IndexCorruptError, match="manifest.json: missing"):
        root.load("v000002")
    path.write_bytes(manifest_bytes(body))  # rebuilt with a valid self-checksum: loads again
    root.load("v000002").close()


def test_missing_and_unlisted_files(two_versions):
    root = two_versions
    vdir = root.version_dir("v000002")
    (vdir / "stray.bin").write_bytes(b"x")
    with pytest.raises(IndexCorruptError, match="versions/v000002/stray.bin: not listed"):
        root.load("v000002")
    root.load("v000002", verify=False).close()
    (vdir / "stray.bin").unlink()
    (vdir / "shards" / "000001" / "y.npy").unlink()
    with pytest.raises(IndexCorruptError, match="versions/v000002/shards/000001/y.npy: missing"):
        root.load("v000002")


def test_verify_false_still_refuses_inconsistent_arrays(two_versions):
    root = two_versions
    path = root.version_dir("v000002") / "shards" / "000000" / "sketch.npy"
    np.save(path, np.zeros((4, SKETCH_DIM + 1), np.float32))
    with root.load("v000002", verify=False) as v:
        with pytest.raises(IndexCorruptError, match="shards/000000/sketch.npy"):
            v.array("sketch")


# --------------------------------------------------------------------------------------- bad pointers


@pytest.mark.parametrize("content", ["v000009\n", "../evil\n", "", "v1\n", "versions/v000001\n", "\xff"])
def test_bad_current_is_refused(two_versions, content):
    root = two_versions
    (root.path / "CURRENT").write_bytes(content.encode("latin-1"))
    with pytest.raises(IndexCorruptError, match="CURRENT"):
        root.current()
    with pytest.raises(IndexCorruptError, match="CURRENT"):
        root.load()
    root.set_current("v000001")  # the way to repair it
    assert root.current() == "v000001"


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "-x", "x" * 129, "a b", "é", "..", "x\n", 3])
def test_unsafe_build_keys_are_refused(tmp_path, key):
    root = IndexRoot(tmp_path / "idx")
    with pytest.raises(ConfigError, match="not a safe name"):
        root.open_build(key)
    assert not (tmp_path / "x").exists() and not (tmp_path / "idx").exists()  # refused before any mkdir


def test_check_safe_name():
    assert check_safe_name("run-2025.01_a", "build key") == "run-2025.01_a"
    assert check_safe_name("x" * 128, "build key") == "x" * 128
    with pytest.raises(ConfigError, match="version name"):
        check_safe_name("../v1", "version name")


def test_version_names_are_checked(two_versions):
    root = two_versions
    for bad in ("../v000001", "v000001/..", "v12", "w000001"):
        with pytest.raises(ConfigError):
            root.load(bad)
        with pytest.raises(ConfigError):
            root.set_current(bad)
    with pytest.raises(ConfigError, match="no version"):
        root.load("v000007")
    with pytest.raises(ConfigError, match="no version"):
        root.set_current("v000007")


def test_load_without_any_version(tmp_path):
    with pytest.raises(DataError, match="no version"):
        IndexRoot(tmp_path).load()


# ------------------------------------------------------------------------------------- publish checks


def test_publish_refuses_gaps_empty_builds_and_mixed_schemas(tmp_path):
    root = IndexRoot(tmp_path)
    with root.open_build("gap") as build:
        with pytest.raises(DataError, match="no shards"):
            root.publish(build, {})
        write(build, 0, shard_data(0, 2))
        write(build, 2, shard_data(2, 2))
        with pytest.raises(DataError, match=r"shards \[1\] are missing"):
            root.publish(build, {})
        write(build, 1, shard_data(1, 2, h_dim=H_DIM + 1))
        with pytest.raises(IndexMismatchError, match="shard 1"):
            root.publish(build, {})
        write(build, 1, shard_data(1, 2))
        with pytest.raises(ConfigError, match="JSON"):
            root.publish(build, {"bad": float("nan")})
        assert root.versions() == [] and root.current() is None
        assert root.publish(build, {}) == "v000001"
    with pytest.raises(ValueError, match="closed or published"):
        write(build, 3, shard_data(3, 1))


def test_write_shard_validates_its_input(tmp_path):
    root = IndexRoot(tmp_path)
    d = shard_data(0, 3)
    rows, arrays, tok, off = d["rows"], d["arrays"], d["token_arrays"], d["offsets"]
    with root.open_build("b") as build:
        cases = [
            (DataError, lambda: build.write_shard(0, arrays, rows[:2], token_arrays=tok, offsets=off)),
            (ConfigError, lambda: build.write_shard(0, {"offsets": arrays["sketch"]}, rows)),
            (ConfigError, lambda: build.write_shard(0, {"../x": arrays["sketch"]}, rows)),
            (DataError, lambda: build.write_shard(0, {"o": np.array([object()] * 3)}, rows)),
            (ConfigError, lambda: build.write_shard(0, arrays, rows, token_arrays=tok)),
            (DataError, lambda: build.write_shard(0, arrays, rows, token_arrays=tok, offsets=off[::-1])),
            (DataError, lambda: build.write_shard(0, arrays, rows, token_arrays=tok, offsets=off[:-1])),
            (DataError, lambda: build.write_shard(0, arrays, rows, token_arrays={"h": tok["h"][1:]}, offsets=off)),
            (DataError, lambda: build.write_shard(0, arrays, [*rows[:2], {"x": float("nan")}])),
            (DataError, lambda: build.write_shard(0, arrays, [*rows[:2], "not a dict"])),
            (ConfigError, lambda: build.write_shard(-1, arrays, rows)),
            (ConfigError, lambda: build.write_shard(0, arrays, rows, token_arrays={"sketch": tok["h"]},
                                                    offsets=off)),
            (ConfigError, lambda: build.put_array("../p.npy", np.ones(2))),
            (ConfigError, lambda: build.put_array("manifest.json", np.ones(2))),
            (ConfigError, lambda: build.put_array("p.bin", np.ones(2))),
            (ConfigError, lambda: build.put_bytes("shards", b"")),
        ]
        for error, call in cases:
            with pytest.raises(error):
                call()
        assert build.done_shards() == []
        assert sorted(p.name for p in build.path.rglob("*")) == ["shards"]  # nothing left behind


def test_a_build_is_open_in_one_place_at_a_time(tmp_path):
    root = IndexRoot(tmp_path)
    build = root.open_build("b")
    with pytest.raises(ConfigError, match="open in another process"):
        root.open_build("b")
    build.close()
    root.open_build("b").close()


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    root = IndexRoot(tmp_path)
    builds = []
    for k in range(4):
        build = root.open_build(f"b{k}")
        write(build, 0, shard_data(k, 2))
        builds.append(build)
    names: list[str] = []
    threads = [threading.Thread(target=lambda b=b: names.append(root.publish(b, {}))) for b in builds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == ["v000001", "v000002", "v000003", "v000004"]
    assert root.current() in names
    for name in names:
        with root.load(name) as v:
            assert v.n == 2
    assert {root.version_of_build(f"b{k}") for k in range(4)} == set(names)
    assert root.version_of_build("other") is None


def test_gc_keeps_newest_and_current(tmp_path):
    root = IndexRoot(tmp_path)
    for k in range(4):
        build_version(root, f"b{k}", [shard_data(k, 2)])
    root.set_current("v000003")  # a roll-back: v000004 is newer than CURRENT
    held = root.load("v000002")
    sketch = held.array("sketch").copy()
    assert root.gc(keep=1) == ["v000001", "v000002"]  # never CURRENT, never one newer than it
    assert root.versions() == ["v000003", "v000004"] and root.current() == "v000003"
    np.testing.assert_array_equal(held.array("sketch"), sketch)  # an open reader keeps working
    held.close()
    assert root.next_version_name() == "v000005"


# ------------------------------------------------------------------------------------------- index add


def test_index_add_links_old_shards(tmp_path, shards3):
    root = IndexRoot(tmp_path)
    build_version(root, "base", shards3)
    new = shard_data(50, 4)
    with root.load("v000001") as v1, root.open_build("add") as build:
        assert build.link_shards_from(v1) == [0, 1, 2]
        write(build, 3, new)
        build.put_array("projection.npy", v1.global_array("projection.npy"))
        root.publish(build, {**v1.manifest, "added": 4})
    v1_file = root.version_dir("v000001") / "shards" / "000001" / "h.npy"
    v2_file = root.version_dir("v000002") / "shards" / "000001" / "h.npy"
    assert os.stat(v1_file).st_ino == os.stat(v2_file).st_ino  # hard-linked, not copied

    with root.load() as v2:
        assert v2.name == "v000002" and v2.manifest["added"] == 4
        assert v2.n == sum(len(s["rows"]) for s in shards3) + 4
        assert_version_equals(v2, concat([*shards3, new]))

    # Rewriting a linked shard in a later build never touches the published files it was linked from.
    with root.load("v000002") as v2, root.open_build("rewrite") as build:
        build.link_shards_from(v2)
        write(build, 1, shard_data(99, 3))
        root.publish(build, {})
    with root.load("v000001", verify=True) as v1:
        assert_version_equals(v1, concat(shards3))
    with root.load("v000002", verify=True) as v2:
        assert_version_equals(v2, concat([*shards3, new]))
    with root.load("v000003", verify=True) as v3:
        assert_version_equals(v3, concat([shards3[0], shard_data(99, 3), shards3[2], new]))


def test_index_add_copies_when_links_fail(tmp_path, shards3, monkeypatch):
    root = IndexRoot(tmp_path)
    build_version(root, "base", shards3)

    def no_link(src, dst, *args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    with root.load() as v1, root.open_build("add") as build:
        build.link_shards_from(v1, start=0)
        build.link_shards_from(v1, start=3)  # the same shards twice
        root.publish(build, {})
    a = root.version_dir("v000001") / "shards" / "000000" / "sketch.npy"
    b = root.version_dir("v000002") / "shards" / "000003" / "sketch.npy"
    assert os.stat(a).st_ino != os.stat(b).st_ino
    with root.load() as v2:
        assert_version_equals(v2, concat(shards3 + shards3))


# --------------------------------------------------------------------------------------------- kill -9

CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from test_store import shard_data, write, KILL_SHARD
from forvalue.indexer.store import IndexRoot
build = IndexRoot(sys.argv[2]).open_build("crash")
print("ready", flush=True)
for i in range(200):
    if not build.shard_done(i):
        write(build, i, shard_data(i, **KILL_SHARD))
"""
KILL_SHARD = {"n": 64, "sketch_dim": 256, "h_dim": 64, "max_tokens": 40}  # about 0.2 MB per shard


def test_kill_9_mid_build_resumes_cleanly(tmp_path):
    root = IndexRoot(tmp_path / "idx")
    rng = random.Random(1)
    progress = []
    for _trial in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(HERE), str(root.path)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.stderr.read().decode()
            time.sleep(rng.uniform(0.05, 0.4))
            assert child.poll() is None, "the child finished before it was killed"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL

        with root.open_build("crash") as build:  # verifies checksums, removes leftovers
            done = build.done_shards()
            assert done == list(range(len(done)))  # written in order, so no gaps
            leftovers = [p.name for p in [*build.path.iterdir(), *(build.path / "shards").iterdir()]
                         if p.name.startswith(".")]
            assert leftovers == []
            for i in done:
                assert_shard_dir_equals(build.path / "shards" / f"{i:06d}", shard_data(i, **KILL_SHARD))
        progress.append(len(done))
    assert progress == sorted(progress) and progress[-1] > 0

    with root.open_build("crash") as build:
        n_shards = len(build.done_shards()) + 1
        write(build, n_shards - 1, shard_data(n_shards - 1, **KILL_SHARD))
        root.publish(build, {})
    with root.load(verify=True) as v:
        assert_version_equals(v, concat([shard_data(i, **KILL_SHARD) for i in range(n_shards)]))
