"""indexer/files.py: crash-safe writes, hashes, safe names and the crash-test hook."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from forvalue.indexer import files
from forvalue.indexer.errors import ConfigError
from forvalue.indexer.files import check_safe_name, sha256_file, write_atomic


def test_write_atomic_gives_umask_permissions_and_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "out.bin"
    write_atomic(p, lambda fh: fh.write(b"old"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask

    def failing(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(p, failing)
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind


def test_write_atomic_makes_parents_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "a" / "b.txt", lambda fh: fh.write(b"x"))
    write_atomic(tmp_path / "a" / "b.txt", lambda fh: fh.write(b"x"), make_parents=True)
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"x"


def test_sha256_file_equals_hashlib_over_several_blocks(tmp_path):
    data = os.urandom(files.HASH_BLOCK * 2 + 12345)
    p = tmp_path / "big"
    p.write_bytes(data)
    assert sha256_file(p) == (hashlib.sha256(data).hexdigest(), len(data))
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == (hashlib.sha256(b"").hexdigest(), 0)


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "a b", "x" * 129, "é", None])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="not a safe name"):
        check_safe_name(name, "build key")


def test_safe_names_pass():
    assert check_safe_name("run-2025.01_a", "build key") == "run-2025.01_a"


def test_fault_point_kills_the_process_there_and_the_old_file_survives(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    code = ("import sys; from forvalue.indexer.files import write_atomic; "
            "write_atomic(sys.argv[1], lambda f: f.write(b'new')); print('survived')")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, files.FAULT_ENV: "file-replace:1"})
    assert r.returncode == -9 and "survived" not in r.stdout  # SIGKILL at the point, as kill -9
    assert target.read_text() == "old"
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, files.FAULT_ENV: "shard-done:1"})  # another point: not reached here
    assert r.returncode == 0 and target.read_text() == "new"


def test_fault_observer_sees_every_point(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(files, "fault_observer", seen.append)
    write_atomic(tmp_path / "g", lambda f: f.write(b"1"))
    write_atomic(tmp_path / "g", lambda f: f.write(b"2"))
    assert seen == ["file-replace", "file-replace"]
