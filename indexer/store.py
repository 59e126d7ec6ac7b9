"""All file I/O of an influence-index directory: resumable builds and immutable, verifiable versions.

An index root DIR holds

    DIR/CURRENT                     the name of the current version, e.g. "v000002\\n"
    DIR/.lock                       flock'd by publishers while they pick a name, rename and switch CURRENT
    DIR/versions/v000001/           published versions, never modified once renamed into place
        manifest.json               format_version, build_key, n_rows, shards, arrays, files, the caller's
                                    fields, and manifest_sha256 (a checksum of the manifest itself)
        shards/000000/              one directory per shard (see below)
        projection.npy, ...         global files (put_array / put_bytes / put_json)
    DIR/builds/<build_key>/         an in-progress build, same inner layout, resumable after kill -9

A shard directory holds one `<name>.npy` per array, `metadata.jsonl` (one JSON object per row),
`rowindex.npy` ((n + 1,) int64 byte offsets of the lines, so row j is bytes [r[j], r[j+1])), and, when the
shard has per-token arrays, `offsets.npy` ((n + 1,) int64: the tokens of row j are [o[j], o[j+1])). Its
`_DONE.json` (row and token counts, array dtypes and shapes, sha256 and size of every other file) is
written last; a shard is done only when `_DONE.json` is valid and every file matches it.

Crash safety. Every file is fsync'd before it becomes visible under its final name, and every name
change is followed by an fsync of the directory. A shard is written into `shards/.tmp-<i>-<pid>/` and
renamed to `shards/<i:06d>` in one step; global files and CURRENT are written to a temporary name and
`os.replace`d. Anything left half-done by a crash (`.tmp-*` entries, shard directories that fail their
`_DONE.json`) is removed when the build is reopened. Files are never modified in place, which is what
makes hard-linking shards between versions (`Build.link_shards_from`) safe.

Fault injection (for tests/reliability/test_crash.py only). With the environment variable
FORVALUE_FAULT="<point>:<n>", the n-th time this process reaches <point> it kills itself with SIGKILL,
as `kill -9` would: no `finally`, no cleanup. The points (FAULT_POINTS): shard-file (a shard file written
into its .tmp- directory), shard-done (its `_DONE.json` written, before the rename into shards/),
link-file (one file of a shard linked or copied from another version), file-replace (a global file or
manifest.json written under its temporary name, before `os.replace`), publish-rename (the build renamed
to versions/<name>, before CURRENT is switched), current-tmp (CURRENT.tmp-<pid> written, before
`os.replace`), current-replaced (CURRENT replaced, before the fsync of DIR), gc-trash (a version renamed
to .trash-*, before it is deleted). Unset, each point costs one environment lookup.

Concurrency. One process at a time may hold a build open (an flock on the build directory; a second
`open_build` of the same key raises). In a distributed build that process is the driver: its workers
write whole shards into the open build with `ShardWriter`, and the driver `refresh`es before publishing.
Publishers serialise on `DIR/.lock`. Readers take no lock: a published version never changes, so a
server can keep an old version memory-mapped while a new one is published (and even after `gc` deletes
it, once `Version.open_all` opened every file: `Index` does).

Nothing here ever unpickles: every `np.load` passes `allow_pickle=False`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import ConfigError, DataError, IndexCorruptError, IndexMismatchError

FORMAT_VERSION = 1
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# One component of a path listed in a manifest: like SAFE_NAME, but the store's own `_DONE.json` is allowed.
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_VERSION_NAME = re.compile(r"^v([0-9]{6,})$")
_SHARD_NAME = re.compile(r"^[0-9]{6,}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
VERSIONS_DIR = "versions"
BUILDS_DIR = "builds"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.json"
DONE_FILE = "_DONE.json"
METADATA_FILE = "metadata.jsonl"
ROWINDEX_FILE = "rowindex.npy"
OFFSETS_FILE = "offsets.npy"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

RESERVED_ARRAY_NAMES = frozenset({"offsets", "rowindex"})
RESERVED_GLOBAL_NAMES = frozenset({MANIFEST_FILE, SHARDS_DIR})
# Manifest keys the store owns; publish overwrites any value the caller gave them.
STORE_KEYS = ("format_version", "build_key", "n_rows", "shards", "arrays", "files", "manifest_sha256")
ARRAY_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes, str: no objects, no structured dtypes

FAULT_ENV = "FORVALUE_FAULT"
FAULT_POINTS = ("shard-file", "shard-done", "link-file", "file-replace", "publish-rename", "current-tmp",
                "current-replaced", "gc-trash")
_fault_hits: dict[str, int] = {}


# ----------------------------------------------------------------------------------------------- helpers


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


def _version_name(name: str) -> str:
    """Check a version name (v000001, v000002, ...) and return it; ConfigError otherwise."""
    check_safe_name(name, "version name")
    if not _VERSION_NAME.fullmatch(name):
        raise ConfigError(f"version name {name!r} is not of the form v000001")
    return name


def _shard_name(i: int) -> str:
    return f"{i:06d}"


def _shard_index(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ConfigError(f"shard index must be an int >= 0, got {i!r}")
    return int(i)


def _parse_shard_name(name: str) -> int | None:
    """The index of a shard directory name, or None if `name` is not the canonical name of one."""
    if _SHARD_NAME.fullmatch(name) and name == _shard_name(int(name)):
        return int(name)
    return None


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


def _fault(point: str) -> None:
    """Crash-test hook: SIGKILL this process at the n-th arrival at `point` when FORVALUE_FAULT="<point>:<n>"."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` (it must not exist), fill it with `write(f)`, and fsync it."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` by a fully written, fsync'd file in one step: tmp file, fsync, os.replace, fsync dir."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    _remove(tmp)
    try:
        _write_new_file(tmp, write)
        _fault("file-replace")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Remove a file or a directory tree; nothing if it does not exist."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def _json_bytes(obj: Any) -> bytes:
    """The canonical JSON form used for the store's own files (sorted keys, UTF-8, strict: no NaN)."""
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def _save_npy(arr: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda f: np.save(f, arr, allow_pickle=False)


def _walk_files(top: Path) -> list[tuple[str, Path]]:
    """Every regular file under `top` as (relative posix path, path), sorted; symlinks are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        for name in dirnames + filenames:
            if (here / name).is_symlink():
                raise IndexCorruptError(f"{here / name}: is a symbolic link; an index holds only plain files")
        for name in filenames:
            full = here / name
            found.append((full.relative_to(top).as_posix(), full))
    return sorted(found)


def _check_array(name: str, arr: Any, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in ARRAY_KINDS or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
        raise DataError(f"{what} {name!r} has dtype {arr.dtype}; use a plain numeric, bool or string dtype")
    if arr.ndim < 1:
        raise DataError(f"{what} {name!r} is a scalar; give one row per sample (or per token)")
    return np.ascontiguousarray(arr)


def _check_array_name(name: str) -> str:
    check_safe_name(name, "array name")
    if name in RESERVED_ARRAY_NAMES:
        raise ConfigError(f"array name {name!r} is reserved by the store; choose another")
    return name


def _check_global_name(name: str) -> str:
    check_safe_name(name, "global file name")
    if name in RESERVED_GLOBAL_NAMES:
        raise ConfigError(f"global file name {name!r} is reserved by the store; choose another")
    return name


# ------------------------------------------------------------------------------------------ shard checks


def _expected_shard_files(record: Mapping[str, Any]) -> set[str]:
    files = {METADATA_FILE, ROWINDEX_FILE} | {f"{name}.npy" for name in record["arrays"]}
    if record["tokens"] is not None:
        files.add(OFFSETS_FILE)
    return files


def _read_done(shard_dir: Path) -> dict:
    """Parse and structurally validate `_DONE.json`; ValueError saying what is wrong otherwise."""
    try:
        record = json.loads((shard_dir / DONE_FILE).read_bytes().decode())
    except FileNotFoundError:
        raise ValueError(f"{DONE_FILE} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{DONE_FILE} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or set(record) != {"rows", "tokens", "arrays", "files"}:
        raise ValueError(f"{DONE_FILE} does not have the keys rows, tokens, arrays, files")
    rows, tokens, arrays, files = record["rows"], record["tokens"], record["arrays"], record["files"]
    if not isinstance(rows, int) or rows < 0 or not (tokens is None or (isinstance(tokens, int) and tokens >= 0)):
        raise ValueError(f"{DONE_FILE} has invalid row or token counts")
    if not isinstance(arrays, dict) or not isinstance(files, dict):
        raise ValueError(f"{DONE_FILE} has invalid arrays or files")
    for name, spec in arrays.items():
        if (not SAFE_NAME.fullmatch(name) or name in RESERVED_ARRAY_NAMES or not isinstance(spec, dict)
                or spec.get("kind") not in ("sample", "token") or not isinstance(spec.get("dtype"), str)
                or not isinstance(spec.get("shape"), list) or not spec["shape"]
                or not all(isinstance(s, int) and s >= 0 for s in spec["shape"])
                or spec["shape"][0] != (rows if spec["kind"] == "sample" else tokens)):
            raise ValueError(f"{DONE_FILE} has an invalid entry for array {name!r}")
    if set(files) != _expected_shard_files(record):
        raise ValueError(f"{DONE_FILE} lists files {sorted(files)}, expected {sorted(_expected_shard_files(record))}")
    for spec in files.values():
        if (not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str)
                or not _HEX64.fullmatch(spec["sha256"]) or not isinstance(spec.get("bytes"), int)):
            raise ValueError(f"{DONE_FILE} has an invalid file entry")
    return record


def _check_shard(shard_dir: Path, verify: bool) -> tuple[dict | None, str]:
    """(record, "") if the shard at `shard_dir` is complete, else (None, what is wrong).

    Args:
        shard_dir: a shard directory.
        verify: also recompute the sha256 of every file (else only names and sizes are checked).
    """
    try:
        record = _read_done(shard_dir)
    except ValueError as exc:
        return None, str(exc)
    present = {p.name for p in shard_dir.iterdir()} - {DONE_FILE}
    if present != set(record["files"]):
        return None, f"holds files {sorted(present)} but {DONE_FILE} lists {sorted(record['files'])}"
    for name, spec in sorted(record["files"].items()):
        path = shard_dir / name
        if path.is_symlink() or not path.is_file():
            return None, f"{name} is not a plain file"
        if path.stat().st_size != spec["bytes"]:
            return None, f"{name} has {path.stat().st_size} bytes, {DONE_FILE} says {spec['bytes']}"
        if verify and sha256_file(path)[0] != spec["sha256"]:
            return None, f"{name} fails its sha256 checksum"
    return record, ""


def _shard_schema(record: Mapping[str, Any]) -> dict[str, dict]:
    """name -> {kind, dtype, shape without the leading row/token axis}: what must agree across shards."""
    return {name: {"kind": spec["kind"], "dtype": spec["dtype"], "shape": spec["shape"][1:]}
            for name, spec in sorted(record["arrays"].items())}


# ----------------------------------------------------------------------------------------------- manifest


def _manifest_bytes(body: Mapping[str, Any]) -> bytes:
    """The bytes of manifest.json: `body` plus manifest_sha256 = sha256 of the canonical JSON of `body`."""
    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return _json_bytes({**body, "manifest_sha256": hashlib.sha256(_json_bytes(body)).hexdigest()})


def _parse_manifest(raw: bytes, rel: str) -> dict:
    """Parse manifest.json bytes and check format_version and the manifest's own checksum.

    The file must be exactly the canonical serialisation of its content and that content must carry the
    sha256 of itself (without the checksum field), so any edit of any byte is detected.

    Raises:
        IndexCorruptError: naming `rel`: not UTF-8 JSON, unsupported format_version, checksum differs,
            or a store field has the wrong type.
    """
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorruptError(f"{rel}: manifest is unreadable, not valid JSON ({exc}); restore or rebuild "
                                "this version") from exc
    if not isinstance(body, dict):
        raise IndexCorruptError(f"{rel}: manifest is not a JSON object; restore or rebuild this version")
    fv = body.get("format_version")
    if fv != FORMAT_VERSION:
        raise IndexCorruptError(f"{rel}: format_version {fv!r} is not supported (this forvalue reads format "
                                f"{FORMAT_VERSION}); use the forvalue that wrote it or rebuild the index")
    claimed = body.get("manifest_sha256")
    if raw != _manifest_bytes(body) or claimed != hashlib.sha256(
            _json_bytes({k: v for k, v in body.items() if k != "manifest_sha256"})).hexdigest():
        raise IndexCorruptError(f"{rel}: checksum differs: the manifest was modified or corrupted; restore or "
                                "rebuild this version")
    _check_manifest_fields(body, rel)
    return body


def _check_manifest_fields(body: Mapping[str, Any], rel: str) -> None:
    def bad(what: str) -> IndexCorruptError:
        return IndexCorruptError(f"{rel}: {what}; restore or rebuild this version")

    shards, arrays, files = body.get("shards"), body.get("arrays"), body.get("files")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("rows"), int) and s["rows"] >= 0
            and (s.get("tokens") is None or (isinstance(s["tokens"], int) and s["tokens"] >= 0)) for s in shards):
        raise bad("'shards' is not a list of {rows, tokens}")
    if body.get("n_rows") != sum(s["rows"] for s in shards):
        raise bad("'n_rows' is not the sum of the shards' rows")
    if not isinstance(arrays, dict) or not all(
            isinstance(a, dict) and a.get("kind") in ("sample", "token") and isinstance(a.get("dtype"), str)
            and isinstance(a.get("shape"), list) for a in arrays.values()):
        raise bad("'arrays' is not a map of name -> {kind, dtype, shape}")
    if not isinstance(files, dict):
        raise bad("'files' is not a map of path -> {sha256, bytes}")
    for path, spec in files.items():
        if (not isinstance(path, str) or not all(_PATH_COMPONENT.fullmatch(c) for c in path.split("/"))
                or not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str)
                or not isinstance(spec.get("bytes"), int)):
            raise bad(f"'files' has an invalid entry {path!r}")


def _locate_rows(starts: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global rows (k,) -> (shard, local row), given the (n_shards + 1,) cumulative row counts."""
    shard = np.searchsorted(starts, idx, side="right") - 1
    return shard, idx - starts[shard]


def _group_by(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, positions of that key in `keys`) for every distinct key, positions in increasing order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    for pos in np.split(order, cuts):
        if pos.size:
            yield int(keys[pos[0]]), pos


# ------------------------------------------------------------------------------------------------- root


class IndexRoot:
    """An index root directory: its published versions, the CURRENT pointer, and builds in progress.

    Creating an IndexRoot touches nothing on disk; reading (`current`, `versions`, `load`) needs no write
    access.

    Args:
        path: the index root directory (need not exist yet).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"IndexRoot({str(self.path)!r})"

    # --- reading ------------------------------------------------------------------------------------

    def current(self) -> str | None:
        """The name of the current version, or None when no version was ever published.

        Raises:
            IndexCorruptError: CURRENT does not hold a version name (e.g. "../evil") or names a version
                that does not exist.
        """
        try:
            raw = (self.path / CURRENT_FILE).read_bytes()
        except FileNotFoundError:
            return None
        try:
            name = _version_name(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ConfigError) as exc:
            raise IndexCorruptError(f"{CURRENT_FILE}: holds {raw[:80]!r}, not a version name like v000001; "
                                    "point it at a published version with set_current") from exc
        if not (self.version_dir(name) / MANIFEST_FILE).is_file():
            raise IndexCorruptError(f"{CURRENT_FILE}: names {name}, which does not exist under {VERSIONS_DIR}/ "
                                    f"(published: {self.versions()}); point it at one with set_current")
        return name

    def versions(self) -> list[str]:
        """Names of the published versions, oldest first."""
        vdir = self.path / VERSIONS_DIR
        if not vdir.is_dir():
            return []
        names = [p.name for p in vdir.iterdir() if _VERSION_NAME.fullmatch(p.name) and p.is_dir()]
        return sorted(names, key=lambda s: int(s[1:]))

    def version_dir(self, name: str) -> Path:
        """The directory of version `name` (checked to be a version name; it may not exist)."""
        return self.path / VERSIONS_DIR / _version_name(name)

    def next_version_name(self) -> str:
        """The name the next publish will take: one more than the newest version, v000001 at first."""
        names = self.versions()
        return f"v{(int(names[-1][1:]) + 1 if names else 1):06d}"

    def version_of_build(self, build_key: str) -> str | None:
        """The newest published version made from build `build_key`, or None.

        A builder killed after `publish` renamed its build but before it recorded success finds its
        work here instead of rebuilding (and can `set_current` it if CURRENT was not switched yet).
        """
        check_safe_name(build_key, "build key")
        for name in reversed(self.versions()):
            rel = f"{VERSIONS_DIR}/{name}/{MANIFEST_FILE}"
            try:
                raw = (self.path / rel).read_bytes()
            except FileNotFoundError:
                continue
            if _parse_manifest(raw, rel).get("build_key") == build_key:
                return name
        return None

    def load(self, version: str | None = None, *, verify: bool = True) -> Version:
        """Open a published version for reading.

        Args:
            version: a version name; None for the current one.
            verify: recompute the size and sha256 of every file listed in the manifest and refuse files
                the manifest does not list. The manifest's own checksum is always checked.

        Returns:
            The opened Version (memory-maps its arrays lazily; `close` it or use it as a context manager).

        Raises:
            DataError: `version` is None and nothing was published yet.
            ConfigError: `version` is not a version name or does not exist.
            IndexCorruptError: naming the file (relative to the index root) and what is wrong with it.
        """
        if version is None:
            version = self.current()
            if version is None:
                raise DataError("no version of this index was published yet; build one first",
                                path=str(self.path))
        path = self.version_dir(version)
        if not path.is_dir():
            raise ConfigError(f"index {self.path} has no version {version!r}; published: {self.versions()}")
        return Version._open(self, version, path, verify)

    # --- writing ------------------------------------------------------------------------------------

    def open_build(self, build_key: str, *, verify: bool = True) -> Build:
        """Create, or reopen to resume, the build DIR/builds/<build_key>.

        Reopening removes what a crash left behind: `.tmp-*` entries, a stale manifest.json, and shard
        directories that are not complete (missing or invalid `_DONE.json`, wrong files or sizes, and,
        with `verify`, files failing their checksum).

        Args:
            build_key: a safe name (see `check_safe_name`) identifying the build, e.g. a hash of its config.
            verify: recompute the checksums of the shards found on disk (else names and sizes only).

        Returns:
            The Build, holding an exclusive lock until `close` or `publish`.

        Raises:
            ConfigError: unsafe build key, or the build is open in another process.
        """
        key = check_safe_name(build_key, "build key")
        builds = self.path / BUILDS_DIR
        builds.mkdir(parents=True, exist_ok=True)
        return Build._open(self, key, builds / key, verify)

    def publish(self, build: Build, manifest: Mapping[str, Any]) -> str:
        """Turn a complete build into the next immutable version and make it current.

        Steps: check shards 0..n-1 are all done and agree on their arrays; hash every file of the build;
        write manifest.json (the caller's fields plus format_version, build_key, n_rows, shards, arrays,
        files, manifest_sha256 — the store's keys overwrite the caller's); then, under DIR/.lock, rename
        the build to versions/<next name> and switch CURRENT. The build is closed afterwards.

        Args:
            build: an open build of this root.
            manifest: JSON-able fields to record (model fingerprint, sketch parameters, seed, ...).

        Returns:
            The new version's name.

        Raises:
            DataError: the build has no shards, a gap in its shard numbers, or unexpected files.
            IndexMismatchError: shards disagree on array names, dtypes or trailing shapes.
            IndexCorruptError: a shard file no longer matches the checksum it was written with.
            ConfigError: `manifest` is not JSON-able, or `build` belongs to another root.
        """
        build._check_open()
        if build.root.path.resolve() != self.path.resolve():
            raise ConfigError(f"build {build.path} belongs to another index root than {self.path}")
        try:
            body = json.loads(json.dumps(dict(manifest), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"manifest fields must be JSON-serialisable (no NaN): {exc}") from exc

        done = build.done_shards()
        if not done:
            raise DataError("the build has no shards; write at least one before publishing", path=str(build.path))
        missing = sorted(set(range(done[-1] + 1)) - set(done))
        if missing:
            raise DataError(f"shards {missing} are missing (done: {done}); write them before publishing",
                            path=str(build.path))
        records = [build._done[i] for i in done]
        schema = _shard_schema(records[0])
        for i, record in enumerate(records):
            if _shard_schema(record) != schema:
                raise IndexMismatchError(f"shard {i} has arrays {_shard_schema(record)} but shard 0 has {schema}; "
                                         "every shard of a version must have the same arrays")

        files: dict[str, dict] = {}
        for rel, full in _walk_files(build.path):
            if rel == MANIFEST_FILE:
                continue
            parts = rel.split("/")
            if parts[0] == SHARDS_DIR:
                i = _parse_shard_name(parts[1]) if len(parts) == 3 else None
                if i is None or i not in build._done:
                    raise DataError(f"unexpected file {rel} in the build; remove it", path=str(build.path))
            elif len(parts) != 1 or not SAFE_NAME.fullmatch(rel):
                raise DataError(f"unexpected file {rel} in the build; remove it", path=str(build.path))
            digest, size = sha256_file(full)
            if parts[0] == SHARDS_DIR and parts[2] != DONE_FILE:
                want = build._done[i]["files"][parts[2]]
                if (digest, size) != (want["sha256"], want["bytes"]):
                    raise IndexCorruptError(f"{BUILDS_DIR}/{build.key}/{rel}: checksum differs from the one it "
                                            f"was written with; rewrite shard {i}")
            files[rel] = {"sha256": digest, "bytes": size}

        body.update(
            format_version=FORMAT_VERSION,
            build_key=build.key,
            n_rows=sum(r["rows"] for r in records),
            shards=[{"rows": r["rows"], "tokens": r["tokens"]} for r in records],
            arrays=schema,
            files=files,
        )
        raw = _manifest_bytes(body)
        _write_atomic(build.path / MANIFEST_FILE, lambda f: f.write(raw))

        versions = self.path / VERSIONS_DIR
        versions.mkdir(exist_ok=True)
        _fsync_dir(self.path)
        with self.locked():
            name = self.next_version_name()
            dest = versions / name
            if dest.exists():  # only if someone bypassed the lock
                raise ConfigError(f"{dest} appeared while publishing; retry")
            os.rename(build.path, dest)
            _fsync_dir(versions)
            _fsync_dir(build.path.parent)
            _fault("publish-rename")
            self._write_current(name)
        build._close(published_as=dest)
        return name

    def set_current(self, name: str) -> None:
        """Atomically point CURRENT at the published version `name` (e.g. to roll back).

        Raises:
            ConfigError: `name` is not a published version.
        """
        if not (self.version_dir(name) / MANIFEST_FILE).is_file():
            raise ConfigError(f"index {self.path} has no version {name!r}; published: {self.versions()}")
        with self.locked():
            self._write_current(name)

    def gc(self, keep: int) -> list[str]:
        """Delete old versions, keeping the `keep` newest and the current one.

        A reader that opened every file of a deleted version (`Version.open_all`) keeps reading it (POSIX
        unlink semantics). A version is first renamed to versions/.trash-*, so a half-deleted one never
        looks like a version. Unpublished builds under builds/ are left alone.

        Args:
            keep: how many of the newest versions to keep, >= 1 (the newest is always kept, so version
                names are never reused).

        Returns:
            The names of the deleted versions.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an int >= 1, got {keep!r}")
        removed = []
        versions = self.path / VERSIONS_DIR
        with self.locked():
            names = self.versions()
            kept = set(names[-keep:]) | {self.current()}
            for name in names:
                if name not in kept:
                    os.rename(versions / name, versions / f"{TRASH_PREFIX}{name}-{os.getpid()}")
                    removed.append(name)
                    _fault("gc-trash")
            if versions.is_dir():
                _fsync_dir(versions)
                for p in versions.iterdir():
                    if p.name.startswith(TRASH_PREFIX):
                        _remove(p)
        return removed

    # --- internals ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, name: str = LOCK_FILE) -> Iterator[None]:
        """Hold the exclusive DIR/<name> lock (blocking; default DIR/.lock) for the duration of the block.

        Other names are other locks (e.g. deletion.py's DIR/.takedown.lock, held around a publish, which
        takes DIR/.lock itself).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write_current(self, name: str) -> None:
        """Write CURRENT.tmp-<pid>, fsync, os.replace onto CURRENT, fsync DIR. Caller holds the lock."""
        for stale in self.path.glob(f"{CURRENT_FILE}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = self.path / f"{CURRENT_FILE}.tmp-{os.getpid()}"
        _write_new_file(tmp, lambda f: f.write(f"{name}\n".encode()))
        _fault("current-tmp")
        os.replace(tmp, self.path / CURRENT_FILE)
        _fault("current-replaced")
        _fsync_dir(self.path)


# ------------------------------------------------------------------------------------------------ build


class Build:
    """An in-progress, resumable build: shards written one at a time, global files, then `publish`.

    Obtained from `IndexRoot.open_build`; holds an exclusive lock on its directory until `close` or
    `publish`. Usable as a context manager (closes on exit).

    Attributes:
        root: the IndexRoot it belongs to.
        key: the build key.
        path: DIR/builds/<key>.
    """

    def __init__(self, root: IndexRoot, key: str, path: Path, lock_fd: int):
        self.root = root
        self.key = key
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._done: dict[int, dict] = {}

    @classmethod
    def _open(cls, root: IndexRoot, key: str, path: Path, verify: bool) -> Build:
        for _ in range(10):
            path.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(f"build {key!r} is open in another process; wait for it to finish or "
                                      "use another build key") from exc
                raise
            # The directory may have been published (renamed away) between mkdir and flock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ConfigError(f"build {key!r} keeps being published under us; retry")
        build = cls(root, key, path, fd)
        try:
            build._recover(verify)
        except BaseException:
            build.close()
            raise
        return build

    def _recover(self, verify: bool) -> None:
        """Remove crash leftovers and record which shards are complete."""
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX) or p.name == MANIFEST_FILE:
                _remove(p)
        shards = self.path / SHARDS_DIR
        shards.mkdir(exist_ok=True)
        for p in sorted(shards.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                _remove(p)
                continue
            i = _parse_shard_name(p.name)
            if i is None or not p.is_dir() or p.is_symlink():
                continue  # not ours; publish refuses it
            record, _why = _check_shard(p, verify)
            if record is None:
                _remove(p)
            else:
                self._done[i] = record
        _fsync_dir(shards)
        _fsync_dir(self.path)

    def __repr__(self) -> str:
        return f"Build({str(self.path)!r}, done={self.done_shards()})"

    def __enter__(self) -> Build:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Release the build's lock; it can be reopened with `open_build` to resume. Idempotent."""
        self._close(published_as=None)

    def _close(self, published_as: Path | None) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if published_as is not None:
            self.path = published_as

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise ValueError(f"build {self.key!r} is closed or published; reopen it with open_build")

    # --- shards -------------------------------------------------------------------------------------

    def refresh(self, verify: bool = True) -> list[int]:
        """Re-read which shards are complete, after other processes wrote some (`ShardWriter`); returns them.

        Removes what a crashed writer left behind, as reopening does; so call it only once every writer
        has finished (a distributed build's driver, when its workers are done).
        """
        self._check_open()
        self._done.clear()
        self._recover(verify)
        return self.done_shards()

    def shard_done(self, i: int) -> bool:
        """Whether shard `i` is complete (checked when the build was opened or the shard written)."""
        return _shard_index(i) in self._done

    def done_shards(self) -> list[int]:
        """Indices of the complete shards, sorted."""
        return sorted(self._done)

    def write_shard(self, i: int, arrays: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *,
                    token_arrays: Mapping[str, Any] | None = None, offsets: Any = None) -> None:
        """Write shard `i` completely, or not at all; replaces it if it exists.

        Args:
            i: shard index >= 0.
            arrays: per-sample arrays, name -> (n, ...) with n = len(rows), e.g. "sketch" (n, D) float32.
            rows: n metadata rows, JSON objects (id, prompt, response, extra fields); stored as JSONL,
                UTF-8, without ASCII escaping; NaN is refused.
            token_arrays: per-token arrays, name -> (T, ...), e.g. "h" (T, d) float16, "y" (T,) int32,
                "lse" (T,) float32; given with `offsets`.
            offsets: (n + 1,) non-decreasing integers from 0 to T: the tokens of row j are
                [offsets[j], offsets[j+1]). Stored as int64.

        Raises:
            ConfigError: bad index, reserved or unsafe array name, or token_arrays without offsets.
            DataError: shapes that do not match n or T, an object dtype, bad offsets, or a row that is not a
                JSON object.
        """
        self._check_open()
        i = _shard_index(i)
        n = len(rows)
        payload: dict[str, np.ndarray] = {}
        specs: dict[str, dict] = {}
        names = list(arrays) + list(token_arrays or {})
        if len(set(names)) != len(names):
            raise ConfigError(f"array names must be unique across arrays and token_arrays, got {names}")
        for name, arr in arrays.items():
            arr = _check_array(_check_array_name(name), arr, "array")
            if arr.shape[0] != n:
                raise DataError(f"array {name!r} has {arr.shape[0]} rows but shard {i} has {n} metadata rows")
            payload[f"{name}.npy"] = arr
            specs[name] = {"kind": "sample", "dtype": arr.dtype.str, "shape": list(arr.shape)}
        tokens = None
        if (token_arrays is None) != (offsets is None):
            raise ConfigError("token_arrays and offsets go together: give both or neither")
        if offsets is not None:
            off = np.asarray(offsets)
            if off.dtype.kind not in "iu" or off.shape != (n + 1,):
                raise DataError(f"offsets of shard {i} must be (n + 1,) = ({n + 1},) integers, got "
                                f"{off.shape} {off.dtype}")
            off = off.astype(np.int64)
            if off[0] != 0 or (np.diff(off) < 0).any():
                raise DataError(f"offsets of shard {i} must start at 0 and never decrease")
            tokens = int(off[-1])
            payload[OFFSETS_FILE] = off
            for name, arr in token_arrays.items():
                arr = _check_array(_check_array_name(name), arr, "token array")
                if arr.shape[0] != tokens:
                    raise DataError(f"token array {name!r} has {arr.shape[0]} rows but offsets[-1] = {tokens}")
                payload[f"{name}.npy"] = arr
                specs[name] = {"kind": "token", "dtype": arr.dtype.str, "shape": list(arr.shape)}

        lines = []
        for j, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise DataError(f"metadata row {j} of shard {i} is a {type(row).__name__}, not a JSON object",
                                row=j)
            try:
                lines.append(json.dumps(dict(row), ensure_ascii=False, allow_nan=False,
                                        separators=(",", ":")).encode() + b"\n")
            except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogates) is a ValueError
                raise DataError(f"metadata row {j} of shard {i} is not JSON-serialisable: {exc}", row=j) from exc
        rowindex = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(line) for line in lines], out=rowindex[1:])
        payload[ROWINDEX_FILE] = rowindex

        record = {"rows": n, "tokens": tokens, "arrays": specs, "files": {}}
        shards = self.path / SHARDS_DIR
        tmp = shards / f"{TMP_PREFIX}{_shard_name(i)}-{os.getpid()}"
        _remove(tmp)
        tmp.mkdir()
        try:
            for fname, arr in payload.items():
                _write_new_file(tmp / fname, _save_npy(arr))
                _fault("shard-file")
            _write_new_file(tmp / METADATA_FILE, lambda f: f.writelines(lines))
            _fault("shard-file")
            for fname in sorted(payload) + [METADATA_FILE]:
                digest, size = sha256_file(tmp / fname)
                record["files"][fname] = {"sha256": digest, "bytes": size}
            done = _json_bytes(record)
            _write_new_file(tmp / DONE_FILE, lambda f: f.write(done))
            _fsync_dir(tmp)
            _fault("shard-done")
            self._install(tmp, i)
        except BaseException:
            _remove(tmp)
            raise
        self._done[i] = json.loads(done)

    def link_shards_from(self, version: Version, start: int = 0) -> list[int]:
        """Hard-link (or copy, where links fail) every shard of a published version into this build.

        Shard j of `version` becomes shard start + j here (existing shards there are replaced). Linking is
        safe because the store never modifies a file in place. This is "index add": link the old shards,
        write new ones after them, publish.

        Args:
            version: an open Version (of any index root on the same machine).
            start: the index the version's shard 0 gets here.

        Returns:
            The indices written here.

        Raises:
            IndexCorruptError: a shard of `version` is incomplete (its files do not match its _DONE.json).
        """
        self._check_open()
        start = _shard_index(start)
        written = []
        for j in range(version.n_shards):
            src = version.path / SHARDS_DIR / _shard_name(j)
            record, why = _check_shard(src, verify=False)
            if record is None:
                raise IndexCorruptError(f"{version._rel(f'{SHARDS_DIR}/{_shard_name(j)}')}: {why}; "
                                        "restore or rebuild that version")
            i = start + j
            tmp = self.path / SHARDS_DIR / f"{TMP_PREFIX}{_shard_name(i)}-{os.getpid()}"
            _remove(tmp)
            tmp.mkdir()
            try:
                for fname in sorted(record["files"]) + [DONE_FILE]:
                    try:
                        os.link(src / fname, tmp / fname)
                    except OSError:  # another file system, or links not allowed: copy instead
                        with open(src / fname, "rb") as fsrc:
                            _write_new_file(tmp / fname, lambda f: shutil.copyfileobj(fsrc, f, HASH_BLOCK))
                    _fault("link-file")
                _fsync_dir(tmp)
                self._install(tmp, i)
            except BaseException:
                _remove(tmp)
                raise
            self._done[i] = record
            written.append(i)
        return written

    def _install(self, tmp: Path, i: int) -> None:
        """Rename a complete shard directory `tmp` to shards/<i>, moving an existing one aside first."""
        shards = tmp.parent
        dest = shards / _shard_name(i)
        self._done.pop(i, None)
        aside = None
        if dest.exists():
            aside = shards / f"{TMP_PREFIX}old-{_shard_name(i)}-{os.getpid()}"
            _remove(aside)
            os.rename(dest, aside)
        os.rename(tmp, dest)
        _fsync_dir(shards)
        if aside is not None:
            _remove(aside)

    def shard_info(self, i: int) -> dict:
        """What done shard `i` holds: {"rows": n, "tokens": T or None, "arrays": name -> {kind, dtype, shape}}.

        Raises:
            ConfigError: shard `i` is not done.
        """
        record = self._done_record(i)
        return json.loads(json.dumps({k: record[k] for k in ("rows", "tokens", "arrays")}))

    def read_shard_array(self, i: int, name: str) -> np.ndarray:
        """Array `name` of done shard `i` (or "offsets", its (n + 1,) token offsets), memory-mapped read-only.

        For steps that need the shards before publishing, e.g. training a FAISS index on the sketches.
        """
        record = self._done_record(i)
        if not (name in record["arrays"] or (name == "offsets" and record["tokens"] is not None)):
            raise ConfigError(f"shard {i} of build {self.key!r} has no array {name!r} (it has "
                              f"{sorted(record['arrays'])})")
        return np.load(self.path / SHARDS_DIR / _shard_name(i) / f"{name}.npy", mmap_mode="r",
                       allow_pickle=False)

    def _done_record(self, i: int) -> dict:
        self._check_open()
        i = _shard_index(i)
        if i not in self._done:
            raise ConfigError(f"shard {i} of build {self.key!r} is not done (done: {self.done_shards()})")
        return self._done[i]

    # --- global files -------------------------------------------------------------------------------

    def has_file(self, name: str) -> bool:
        """Whether global file `name` was written (e.g. to skip recomputing it on resume)."""
        self._check_open()
        return (self.path / _check_global_name(name)).is_file()

    def read_array(self, name: str) -> np.ndarray:
        """Global array file `name` written by `put_array`, memory-mapped read-only."""
        self._check_open()
        return np.load(self.path / _check_global_name(name), mmap_mode="r", allow_pickle=False)

    def read_json(self, name: str) -> Any:
        """The content of global JSON file `name` written by `put_json`."""
        self._check_open()
        return json.loads((self.path / _check_global_name(name)).read_bytes().decode("utf-8"))

    def put_array(self, name: str, arr: Any) -> None:
        """Write a global array file atomically, e.g. put_array("projection.npy", P).

        Args:
            name: a safe file name ending in ".npy".
            arr: the array (no object or structured dtype).
        """
        self._check_open()
        _check_global_name(name)
        if not name.endswith(".npy"):
            raise ConfigError(f"global array file name {name!r} must end in .npy")
        arr = _check_array(name, arr, "global array")
        _write_atomic(self.path / name, _save_npy(arr))

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write a global file of raw bytes atomically, e.g. put_bytes("index.faiss", serialized)."""
        self._check_open()
        _check_global_name(name)
        data = bytes(data)
        _write_atomic(self.path / name, lambda f: f.write(data))

    def put_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Write a global file atomically from `write(f)`, which fills the binary file `f` (e.g. a FAISS index
        streamed by `SketchIndex.write`, too large to hold as bytes)."""
        self._check_open()
        _check_global_name(name)
        _write_atomic(self.path / name, write)

    def link_global_from(self, version: Version, name: str) -> None:
        """Hard-link (or copy, where links fail) global file `name` of a published version into this build,
        atomically (e.g. a new version that shares its base's maps and FAISS file: deletion.py)."""
        self._check_open()
        _check_global_name(name)
        src = version.global_file(name)
        tmp = self.path / f"{TMP_PREFIX}{name}-{os.getpid()}"
        _remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            with open(src, "rb") as fsrc:
                _write_new_file(tmp, lambda f: shutil.copyfileobj(fsrc, f, HASH_BLOCK))
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)

    def put_json(self, name: str, obj: Any) -> None:
        """Write a global JSON file atomically (canonical form: sorted keys, UTF-8, no NaN)."""
        self._check_open()
        _check_global_name(name)
        try:
            data = _json_bytes(obj)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"global JSON file {name!r}: content is not JSON-serialisable: {exc}") from exc
        _write_atomic(self.path / name, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------- version


class Version:
    """A published, immutable version, opened for reading by `IndexRoot.load`.

    Shard arrays are memory-mapped read-only on first use; rows are read by seeking through each shard's
    row index. Safe to share between threads. Usable as a context manager (closes on exit).

    Attributes:
        name: e.g. "v000002".
        path: DIR/versions/<name>.
        manifest: the parsed manifest.json.
        n: total number of rows (samples) over all shards.
        n_shards: number of shards.
        shard_rows: (n_shards,) int64 rows per shard.
        row_starts: (n_shards + 1,) int64; global row g lives in the shard s with
            row_starts[s] <= g < row_starts[s + 1], at local row g - row_starts[s].
        arrays: name -> {"kind": "sample" | "token", "dtype", "shape": shape after the row/token axis}.
    """

    def __init__(self, root: IndexRoot, name: str, path: Path, manifest: dict):
        self.root = root
        self.name = name
        self.path = path
        self.manifest = manifest
        self.arrays: dict[str, dict] = manifest["arrays"]
        self.shard_rows = np.array([s["rows"] for s in manifest["shards"]], dtype=np.int64)
        self.row_starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        self.n = int(manifest["n_rows"])
        self.n_shards = len(manifest["shards"])
        self._lock = threading.Lock()
        self._maps: dict[str, list[np.ndarray]] = {}
        self._small: dict[tuple[int, str], np.ndarray] = {}
        self._fds: dict[int, int] = {}

    @classmethod
    def _open(cls, root: IndexRoot, name: str, path: Path, verify: bool) -> Version:
        rel = f"{VERSIONS_DIR}/{name}/{MANIFEST_FILE}"
        try:
            raw = (path / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            raise IndexCorruptError(f"{rel}: missing; restore or rebuild this version") from None
        version = cls(root, name, path, _parse_manifest(raw, rel))
        if verify:
            version.verify()
        return version

    def __repr__(self) -> str:
        return f"Version({self.name!r}, n={self.n}, shards={self.n_shards})"

    def __enter__(self) -> Version:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory maps and close the metadata files. Idempotent."""
        with self._lock:
            self._maps.clear()
            self._small.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _rel(self, rel: str) -> str:
        return f"{VERSIONS_DIR}/{self.name}/{rel}"

    def verify(self) -> None:
        """Recompute size and sha256 of every file in the manifest; refuse files it does not list.

        Raises:
            IndexCorruptError: naming the first bad file (relative to the index root): missing, size
                differs, checksum differs, or not listed in the manifest.
        """
        files = self.manifest["files"]
        for rel, spec in sorted(files.items()):
            path = self.path.joinpath(*rel.split("/"))
            where = self._rel(rel)
            if path.is_symlink() or not path.is_file():
                raise IndexCorruptError(f"{where}: missing; restore or rebuild this version")
            size = path.stat().st_size
            if size != spec["bytes"]:
                raise IndexCorruptError(f"{where}: size differs: {size} bytes, the manifest says {spec['bytes']} "
                                        "(truncated or appended to); restore or rebuild this version")
            if sha256_file(path)[0] != spec["sha256"]:
                raise IndexCorruptError(f"{where}: checksum differs from the manifest (sha256); the file is "
                                        "corrupt: restore or rebuild this version")
        for rel, _ in _walk_files(self.path):
            if rel != MANIFEST_FILE and rel not in files:
                raise IndexCorruptError(f"{self._rel(rel)}: not listed in the manifest; a published version "
                                        "never changes: remove the file or rebuild this version")

    # --- arrays -------------------------------------------------------------------------------------

    def _spec(self, name: str) -> dict:
        if name not in self.arrays:
            raise IndexMismatchError(f"version {self.name} has no array {name!r} (it has {sorted(self.arrays)}); "
                                     "build the index with it or ask for another")
        return self.arrays[name]

    def _load_npy(self, rel: str, mmap: bool) -> np.ndarray:
        try:
            return np.load(self.path.joinpath(*rel.split("/")), mmap_mode="r" if mmap else None,
                           allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise IndexCorruptError(f"{self._rel(rel)}: unreadable as .npy ({exc}); restore or rebuild this "
                                    "version") from exc

    def shard_arrays(self, name: str) -> list[np.ndarray]:
        """Read-only memory maps of array `name`, one per shard: (rows_s, ...) or (tokens_s, ...)."""
        spec = self._spec(name)
        with self._lock:
            maps = self._maps.get(name)
            if maps is None:
                maps = []
                for s, shard in enumerate(self.manifest["shards"]):
                    rel = f"{SHARDS_DIR}/{_shard_name(s)}/{name}.npy"
                    arr = self._load_npy(rel, mmap=True)
                    lead = shard["rows"] if spec["kind"] == "sample" else shard["tokens"]
                    if arr.dtype.str != spec["dtype"] or list(arr.shape) != [lead] + list(spec["shape"]):
                        raise IndexCorruptError(f"{self._rel(rel)}: holds {arr.shape} {arr.dtype.str}, the manifest "
                                                f"says ({lead}, {spec['shape']}) {spec['dtype']}; rebuild")
                    maps.append(arr)
                self._maps[name] = maps
        return maps

    def array(self, name: str) -> np.ndarray:
        """Array `name` over all shards, concatenated in memory: (n, ...) per-sample, (T, ...) per-token."""
        maps = self.shard_arrays(name)
        spec = self.arrays[name]
        if not maps:
            return np.empty([0] + spec["shape"], dtype=np.dtype(spec["dtype"]))
        return np.concatenate(maps)

    def _shard_small(self, s: int, fname: str) -> np.ndarray:
        """The in-memory offsets or rowindex of shard s, checked to be (rows + 1,) int64."""
        key = (s, fname)
        with self._lock:
            arr = self._small.get(key)
        if arr is None:
            rel = f"{SHARDS_DIR}/{_shard_name(s)}/{fname}"
            arr = self._load_npy(rel, mmap=False)
            if arr.dtype != np.int64 or arr.shape != (self.shard_rows[s] + 1,):
                raise IndexCorruptError(f"{self._rel(rel)}: holds {arr.shape} {arr.dtype}, expected "
                                        f"({self.shard_rows[s] + 1},) int64; rebuild")
            with self._lock:
                self._small[key] = arr
        return arr

    def open_all(self) -> None:
        """Map every array, read every row index and token offsets, and open every metadata file now.

        Otherwise each is opened on first use. A version opened this way keeps answering after its
        directory is deleted (`IndexRoot.gc`): open files and maps outlive their names (POSIX unlink
        semantics). `Index` does this for every version it serves.
        """
        for name in self.arrays:
            self.shard_arrays(name)
        for s in range(self.n_shards):
            self._shard_small(s, ROWINDEX_FILE)
            if self.manifest["shards"][s]["tokens"] is not None:
                self._shard_small(s, OFFSETS_FILE)
            self._metadata_fd(s)

    def offsets(self) -> np.ndarray:
        """(n + 1,) int64 global token offsets: the tokens of row g are [o[g], o[g+1]) of `array(name)`."""
        self._check_tokens()
        parts, base = [np.zeros(1, dtype=np.int64)], 0
        for s in range(self.n_shards):
            parts.append(self._shard_small(s, OFFSETS_FILE)[1:] + base)
            base += self.manifest["shards"][s]["tokens"]
        return np.concatenate(parts)

    def _check_tokens(self) -> None:
        if any(s["tokens"] is None for s in self.manifest["shards"]):
            raise IndexMismatchError(f"version {self.name} has no per-token arrays; build the index with them")

    def _indices(self, global_indices: Any) -> np.ndarray:
        idx = np.asarray(global_indices)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise DataError(f"row indices must be a 1-D sequence of ints, got {idx.shape} {idx.dtype}")
        bad = (idx < 0) | (idx >= self.n)
        if bad.any():
            raise DataError(f"row index {int(idx[bad][0])} is out of range: version {self.name} has rows "
                            f"0..{self.n - 1}")
        return idx.astype(np.int64)

    def locate(self, global_indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows (k,) -> (shard (k,), local row (k,)), both int64.

        Raises:
            DataError: an index outside 0..n-1.
        """
        return _locate_rows(self.row_starts, self._indices(global_indices))

    def take(self, name: str, global_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the per-sample array `name` for the given global rows, in that order: (k, ...)."""
        spec = self._spec(name)
        if spec["kind"] != "sample":
            raise ConfigError(f"array {name!r} is per-token; use token_rows")
        shard, local = self.locate(global_indices)
        maps = self.shard_arrays(name)
        out = np.empty((shard.size, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
        for s, pos in _group_by(shard):
            out[pos] = maps[s][local[pos]]
        return out

    def token_rows(self, global_indices: Sequence[int] | np.ndarray,
                   names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Gather the token rows of the given samples, in the requested order.

        For requested samples g_0..g_{k-1} with token counts c_j, out[name] holds the tokens of g_0, then
        of g_1, ...: (Σ c_j, ...), and out["offsets"] = (k + 1,) int64 with out["offsets"][j+1] -
        out["offsets"][j] = c_j. One vectorised gather per shard and array.

        Args:
            global_indices: (k,) global rows; repeats allowed.
            names: per-token arrays to gather (default all of them).

        Returns:
            name -> gathered array, plus "offsets".
        """
        self._check_tokens()
        if names is None:
            names = [name for name, spec in sorted(self.arrays.items()) if spec["kind"] == "token"]
        for name in names:
            if self._spec(name)["kind"] != "token":
                raise ConfigError(f"array {name!r} is per-sample; use take")
        shard, local = self.locate(global_indices)
        k = shard.size
        starts = np.zeros(k, dtype=np.int64)
        ends = np.zeros(k, dtype=np.int64)
        groups = list(_group_by(shard))
        for s, pos in groups:
            off = self._shard_small(s, OFFSETS_FILE)
            starts[pos] = off[local[pos]]
            ends[pos] = off[local[pos] + 1]
        lengths = ends - starts
        out_offsets = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        total = int(out_offsets[-1])
        # Output token t comes from shard tok_shard[t], local token src[t].
        src = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
        tok_shard = np.repeat(shard, lengths)
        tok_groups = list(_group_by(tok_shard))
        out: dict[str, np.ndarray] = {}
        for name in names:
            spec = self.arrays[name]
            maps = self.shard_arrays(name)
            gathered = np.empty((total, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
            for s, pos in tok_groups:
                gathered[pos] = maps[s][src[pos]]
            out[name] = gathered
        out["offsets"] = out_offsets
        return out

    # --- metadata rows ------------------------------------------------------------------------------

    def _metadata_fd(self, s: int) -> int:
        with self._lock:
            fd = self._fds.get(s)
            if fd is None:
                rel = f"{SHARDS_DIR}/{_shard_name(s)}/{METADATA_FILE}"
                try:
                    fd = os.open(self.path.joinpath(*rel.split("/")), os.O_RDONLY)
                except FileNotFoundError:
                    raise IndexCorruptError(f"{self._rel(rel)}: missing; restore or rebuild this version") from None
                self._fds[s] = fd
        return fd

    def rows(self, global_indices: Sequence[int] | np.ndarray) -> list[dict]:
        """The metadata rows of the given global rows, in that order (one pread per row)."""
        shard, local = self.locate(global_indices)
        out: list[dict | None] = [None] * shard.size
        for s, pos in _group_by(shard):
            rowindex = self._shard_small(s, ROWINDEX_FILE)
            fd = self._metadata_fd(s)
            for p in pos:
                j = int(local[p])
                a, b = int(rowindex[j]), int(rowindex[j + 1])
                raw = os.pread(fd, b - a, a)
                try:
                    if len(raw) != b - a or not raw.endswith(b"\n"):
                        raise ValueError("line is cut short")
                    row = json.loads(raw[:-1].decode("utf-8"))
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except ValueError as exc:
                    rel = self._rel(f"{SHARDS_DIR}/{_shard_name(s)}/{METADATA_FILE}")
                    raise IndexCorruptError(f"{rel}: row {j} is unreadable ({exc}); restore or rebuild this "
                                            "version") from exc
                out[p] = row
        return out  # type: ignore[return-value]

    # --- global files -------------------------------------------------------------------------------

    def global_file(self, name: str) -> Path:
        """The path of global file `name` (e.g. "index.faiss"), which the manifest must list."""
        _check_global_name(name)
        if name not in self.manifest["files"]:
            globals_ = sorted(f for f in self.manifest["files"] if "/" not in f)
            raise IndexMismatchError(f"version {self.name} has no file {name!r} (it has {globals_}); build the "
                                     "index with it")
        return self.path / name

    def global_array(self, name: str) -> np.ndarray:
        """Global array file `name` (e.g. "projection.npy"), memory-mapped read-only."""
        self.global_file(name)
        return self._load_npy(name, mmap=True)

    def global_json(self, name: str) -> Any:
        """The parsed content of global JSON file `name`."""
        try:
            return json.loads(self.global_file(name).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexCorruptError(f"{self._rel(name)}: not valid JSON ({exc}); restore or rebuild") from exc


# ------------------------------------------------------------------------------------------ shard writer


class ShardWriter(Build):
    """Writes shards into a build that another process holds open: the workers of a distributed build.

    The build's driver opens the build (and holds its lock), the workers write whole shards with
    `write_shard` exactly as `Build.write_shard` does (a temporary directory, fsync'd, renamed into place),
    then the driver calls `Build.refresh` and publishes. Two writers of the same shard (a retried task
    whose first attempt still runs) write the same content; the last rename wins. Global files are the
    driver's: only `write_shard` is meant for workers.

    Args:
        build_dir: DIR/builds/<key> of the open build (on a file system every worker sees).

    Raises:
        ConfigError: `build_dir` is not a build directory (no shards/ in it).
    """

    def __init__(self, build_dir: str | os.PathLike):
        path = Path(build_dir)
        if not (path / SHARDS_DIR).is_dir():
            raise ConfigError(f"{path} is not an open build directory (it has no {SHARDS_DIR}/); open the build "
                              "in the driver first")
        super().__init__(IndexRoot(path.parent.parent), path.name, path, lock_fd=None)

    def _check_open(self) -> None:
        if not (self.path / SHARDS_DIR).is_dir():
            raise ConfigError(f"build {self.path} is gone (published or removed); this worker's shard is not needed")

    def close(self) -> None:  # holds no lock
        pass
