"""The on-disk format of an influence index: names, the layout's constants, and the checks of manifests and
shards that the root, the build writer and the version reader share (store.py holds the layout's description).

Pure checks over paths and parsed JSON; writing is files.py's, the roles are store.py (root, CURRENT, publish,
gc), store_build.py (builds) and store_version.py (published versions).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from .errors import ConfigError, DataError, IndexCorruptError
from .files import SAFE_NAME, check_safe_name, json_bytes, sha256_file

FORMAT_VERSION = 1

# One component of a path listed in a manifest: like SAFE_NAME, but the store's own `_DONE.json` is allowed.
PATH_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
VERSION_NAME = re.compile(r"^v([0-9]{6,})$")
SHARD_NAME = re.compile(r"^[0-9]{6,}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".lock"
VERSIONS_DIR = "versions"
BUILDS_DIR = "builds"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"  # HMAC-SHA256 of manifest.json with the signing key, when one is configured
SIGNING_KEY_ENV = "FORVALUE_SIGNING_KEY_FILE"
DONE_FILE = "_DONE.json"
METADATA_FILE = "metadata.jsonl"
ROWINDEX_FILE = "rowindex.npy"
OFFSETS_FILE = "offsets.npy"
TRASH_PREFIX = ".trash-"

RESERVED_ARRAY_NAMES = frozenset({"offsets", "rowindex"})
RESERVED_GLOBAL_NAMES = frozenset({MANIFEST_FILE, SHARDS_DIR})
# Manifest keys the store owns; publish overwrites any value the caller gave them.
STORE_KEYS = ("format_version", "build_key", "n_rows", "shards", "arrays", "files", "manifest_sha256")
ARRAY_KINDS = "biufcSU"  # bool, ints, floats, complex, bytes, str: no objects, no structured dtypes


# ----------------------------------------------------------------------------------------------- helpers


def version_name(name: str) -> str:
    """Check a version name (v000001, v000002, ...) and return it; ConfigError otherwise."""
    check_safe_name(name, "version name")
    if not VERSION_NAME.fullmatch(name):
        raise ConfigError(f"version name {name!r} is not of the form v000001")
    return name


def shard_name(i: int) -> str:
    return f"{i:06d}"


def shard_index(i: Any) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ConfigError(f"shard index must be an int >= 0, got {i!r}")
    return int(i)


def parse_shard_name(name: str) -> int | None:
    """The index of a shard directory name, or None if `name` is not the canonical name of one."""
    if SHARD_NAME.fullmatch(name) and name == shard_name(int(name)):
        return int(name)
    return None


def npy_writer(arr: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda f: np.save(f, arr, allow_pickle=False)


def walk_files(top: Path) -> list[tuple[str, Path]]:
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


def check_array(name: str, arr: Any, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in ARRAY_KINDS or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
        raise DataError(f"{what} {name!r} has dtype {arr.dtype}; use a plain numeric, bool or string dtype")
    if arr.ndim < 1:
        raise DataError(f"{what} {name!r} is a scalar; give one row per sample (or per token)")
    return np.ascontiguousarray(arr)


def check_array_name(name: str) -> str:
    check_safe_name(name, "array name")
    if name in RESERVED_ARRAY_NAMES:
        raise ConfigError(f"array name {name!r} is reserved by the store; choose another")
    return name


def check_global_name(name: str) -> str:
    check_safe_name(name, "global file name")
    if name in RESERVED_GLOBAL_NAMES:
        raise ConfigError(f"global file name {name!r} is reserved by the store; choose another")
    return name


# ------------------------------------------------------------------------------------------ shard checks


def expected_shard_files(record: Mapping[str, Any]) -> set[str]:
    files = {METADATA_FILE, ROWINDEX_FILE} | {f"{name}.npy" for name in record["arrays"]}
    if record["tokens"] is not None:
        files.add(OFFSETS_FILE)
    return files


def read_done(shard_dir: Path) -> dict:
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
    if set(files) != expected_shard_files(record):
        raise ValueError(f"{DONE_FILE} lists files {sorted(files)}, expected {sorted(expected_shard_files(record))}")
    for spec in files.values():
        if (not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str)
                or not HEX64.fullmatch(spec["sha256"]) or not isinstance(spec.get("bytes"), int)):
            raise ValueError(f"{DONE_FILE} has an invalid file entry")
    return record


def check_shard(shard_dir: Path, verify: bool) -> tuple[dict | None, str]:
    """(record, "") if the shard at `shard_dir` is complete, else (None, what is wrong).

    Args:
        shard_dir: a shard directory.
        verify: also recompute the sha256 of every file (else only names and sizes are checked).
    """
    try:
        record = read_done(shard_dir)
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


def shard_schema(record: Mapping[str, Any]) -> dict[str, dict]:
    """name -> {kind, dtype, shape without the leading row/token axis}: what must agree across shards."""
    return {name: {"kind": spec["kind"], "dtype": spec["dtype"], "shape": spec["shape"][1:]}
            for name, spec in sorted(record["arrays"].items())}


# ----------------------------------------------------------------------------------------------- manifest


def manifest_bytes(body: Mapping[str, Any]) -> bytes:
    """The bytes of manifest.json: `body` plus manifest_sha256 = sha256 of the canonical JSON of `body`."""
    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return json_bytes({**body, "manifest_sha256": hashlib.sha256(json_bytes(body)).hexdigest()})


def parse_manifest(raw: bytes, rel: str) -> dict:
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
    if raw != manifest_bytes(body) or claimed != hashlib.sha256(
            json_bytes({k: v for k, v in body.items() if k != "manifest_sha256"})).hexdigest():
        raise IndexCorruptError(f"{rel}: checksum differs: the manifest was modified or corrupted; restore or "
                                "rebuild this version")
    check_manifest_fields(body, rel)
    return body


def check_manifest_fields(body: Mapping[str, Any], rel: str) -> None:
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
        if (not isinstance(path, str) or not all(PATH_COMPONENT.fullmatch(c) for c in path.split("/"))
                or not isinstance(spec, dict) or not isinstance(spec.get("sha256"), str)
                or not isinstance(spec.get("bytes"), int)):
            raise bad(f"'files' has an invalid entry {path!r}")


def locate_rows(starts: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global rows (k,) -> (shard, local row), given the (n_shards + 1,) cumulative row counts."""
    shard = np.searchsorted(starts, idx, side="right") - 1
    return shard, idx - starts[shard]


def group_positions(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, positions of that key in `keys`) for every distinct key, positions in increasing order."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    for pos in np.split(order, cuts):
        if pos.size:
            yield int(keys[pos[0]]), pos


# ------------------------------------------------------------------------------------------------- root



class RootLike(Protocol):
    """What a build or a version needs of its index root (store.IndexRoot): its folder and signing key."""

    path: Path
    signing_key: bytes | None

def manifest_signature(key: bytes, raw: bytes) -> bytes:
    """The signature file's content for manifest bytes `raw`: hex HMAC-SHA256 with `key`, and a newline."""
    return hmac.new(key, raw, hashlib.sha256).hexdigest().encode() + b"\n"


def check_signature(key: bytes, raw: bytes, sig_path: Path, rel: str) -> None:
    """Refuse a manifest that is not signed with `key` (no signature file, or another signature).

    Raises:
        IndexCorruptError: naming `rel`; the signature's content is never echoed.
    """
    try:
        with open(sig_path, "rb") as f:
            got = f.read(256)
    except FileNotFoundError:
        raise IndexCorruptError(f"{rel}: the version is not signed, and a signing key is configured "
                                f"({SIGNING_KEY_ENV}); it was not published with the key: rebuild it with the key, "
                                "or unset the key to read unsigned indexes") from None
    if sig_path.is_symlink() or not hmac.compare_digest(got, manifest_signature(key, raw)):
        raise IndexCorruptError(f"{rel}: the signature does not match the configured signing key ({SIGNING_KEY_ENV}):"
                                " the manifest was changed or signed with another key; restore or rebuild this "
                                "version")


def signing_key_from_env() -> bytes | None:
    """The signing key in the file named by FORVALUE_SIGNING_KEY_FILE (stripped), or None when unset.

    Raises:
        ConfigError: the file cannot be read or holds fewer than 16 bytes.
    """
    name = os.environ.get(SIGNING_KEY_ENV)
    if not name:
        return None
    try:
        key = Path(name).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{SIGNING_KEY_ENV}: cannot read the signing key file {name!r} ({exc.strerror or exc}); "
                          "point it at a readable file, or unset it") from None
    if len(key) < 16:
        raise ConfigError(f"{SIGNING_KEY_ENV}: the key in {name!r} is shorter than 16 bytes; make one with "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return key
