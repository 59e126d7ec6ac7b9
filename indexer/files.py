"""File primitives of forvalue's stores: safe names, hashes, crash-safe writes, and the crash-test hooks.

Every file that must survive a crash goes through `write_new_file` (create, write, fsync) or `write_atomic`
(the same under a temporary name, then one `os.replace` and an fsync of the folder): a reader sees the old file
or the new one, never a part. Used by the index store (store*.py), the data writers (data.py), the first stage's
files (ann.py) and the protocol's generated code (server/proto_gen.py).

Fault injection (tests/reliability/test_crash.py only): with FORVALUE_FAULT="<point>:<n>", the n-th time this
process reaches <point> (`fault(point)`, FAULT_POINTS) it kills itself with SIGKILL, as `kill -9` would: no
`finally`, no cleanup. `fault_observer`, when set, sees every point reached (the crash tests' trace).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConfigError

HASH_BLOCK = 1 << 20  # bytes read at a time when hashing
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TMP_PREFIX = ".tmp-"
FAULT_ENV = "FORVALUE_FAULT"
FAULT_POINTS = ("shard-file", "shard-done", "link-file", "file-replace", "publish-rename", "current-tmp",
                "current-replaced", "gc-trash")
_fault_hits: dict[str, int] = {}
_UMASK = os.umask(0)  # read once, at import (setting it again later would race with other threads)
os.umask(_UMASK)
fault_observer: Callable[[str], None] | None = None  # sees every fault point reached (tests)


def check_safe_name(name: str, what: str) -> str:
    """Check that `name` can be used as one path component, and return it.

    Every name that becomes part of a path (build keys, version names, array and global file names) goes
    through here first; no path is ever built from an unchecked string.

    Args:
        name: the candidate, e.g. "run-2025.01".
        what: what the name is for, used in the error message, e.g. "build key".

    Returns:
        `name` unchanged.

    Raises:
        ConfigError: `name` is not a str whose whole text matches `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`
            (so no "/", no "..", no leading dot, no spaces or newlines, at most 128 characters).
    """
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a safe name: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def excerpt(raw: bytes, limit: int = 24) -> str:
    """A short, sanitised excerpt of file bytes for an error message: printable ASCII letters, digits and
    ._- only, at most `limit` of them, else just the byte count (a message never echoes a file's content)."""
    text = raw[:limit].decode("ascii", errors="replace").strip()
    if text and all(c.isalnum() or c in "._-" for c in text) and len(raw) <= limit:
        return repr(text)
    return f"{len(raw)} byte(s) that are not a version name"


def sha256_file(path: str | os.PathLike) -> tuple[str, int]:
    """sha256 (hex) and size in bytes of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            digest.update(view[:got])
            size += got
    return digest.hexdigest(), size


def fault(point: str) -> None:
    """Crash-test hook: SIGKILL this process at the n-th arrival at `point` when FORVALUE_FAULT="<point>:<n>"."""
    if fault_observer is not None:
        fault_observer(point)
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make the names in folder `path` durable (after a create, rename or delete in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` (it must not exist), fill it with `write(f)`, and fsync it."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], make_parents: bool = False) -> None:
    """Replace `path` by a fully written file in one step: `write(f)` into a temporary file beside it (named
    TMP_PREFIX + name + a unique tail), fsync, os.replace, fsync of the folder.

    A reader (or a crash) sees the old file or the new one, never part of one; a failure leaves the old file
    as it was and no temporary behind. The file gets the permissions a plain open() would give (0666 less
    the umask).

    Args:
        make_parents: create missing parent folders first.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault("file-replace")
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; nothing if it does not exist."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def json_bytes(obj: Any) -> bytes:
    """The canonical JSON form used for the store's own files (sorted keys, UTF-8, strict: no NaN)."""
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()
