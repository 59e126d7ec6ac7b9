"""Index builds in progress: resumable, shard by shard, each written atomically and checked on reopen."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import ConfigError, DataError, IndexCorruptError
from .files import (
    HASH_BLOCK, TMP_PREFIX, fault, fsync_dir, json_bytes, remove, sha256_file, write_atomic, write_new_file,
)
from .store_format import (
    DONE_FILE, MANIFEST_FILE, METADATA_FILE, OFFSETS_FILE, ROWINDEX_FILE, SHARDS_DIR, RootLike, check_array,
    check_array_name, check_global_name, check_shard, npy_writer, parse_shard_name, shard_index, shard_name,
)

from .store_version import Version


class Build:
    """An in-progress, resumable build: shards written one at a time, global files, then `publish`.

    Obtained from `IndexRoot.open_build`; holds an exclusive lock on its directory until `close` or
    `publish`. Usable as a context manager (closes on exit).

    Attributes:
        root: the IndexRoot it belongs to.
        key: the build key.
        path: DIR/builds/<key>.
    """

    def __init__(self, root: RootLike, key: str, path: Path, lock_fd: int):
        self.root = root
        self.key = key
        self.path = path
        self._lock_fd: int | None = lock_fd
        self._done: dict[int, dict] = {}

    @classmethod
    def _open(cls, root: RootLike, key: str, path: Path, verify: bool) -> Build:
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
                remove(p)
        shards = self.path / SHARDS_DIR
        shards.mkdir(exist_ok=True)
        for p in sorted(shards.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                remove(p)
                continue
            i = parse_shard_name(p.name)
            if i is None or not p.is_dir() or p.is_symlink():
                continue  # not ours; publish refuses it
            record, _why = check_shard(p, verify)
            if record is None:
                remove(p)
            else:
                self._done[i] = record
        fsync_dir(shards)
        fsync_dir(self.path)

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
        return shard_index(i) in self._done

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
        i = shard_index(i)
        n = len(rows)
        payload, specs, tokens = _shard_arrays(i, n, arrays, token_arrays, offsets)
        lines = _metadata_lines(i, rows)
        rowindex = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(line) for line in lines], out=rowindex[1:])
        payload[ROWINDEX_FILE] = rowindex

        record = {"rows": n, "tokens": tokens, "arrays": specs, "files": {}}
        shards = self.path / SHARDS_DIR
        tmp = shards / f"{TMP_PREFIX}{shard_name(i)}-{os.getpid()}"
        remove(tmp)
        tmp.mkdir()
        try:
            for fname, arr in payload.items():
                write_new_file(tmp / fname, npy_writer(arr))
                fault("shard-file")
            write_new_file(tmp / METADATA_FILE, lambda f: f.writelines(lines))
            fault("shard-file")
            for fname in sorted(payload) + [METADATA_FILE]:
                digest, size = sha256_file(tmp / fname)
                record["files"][fname] = {"sha256": digest, "bytes": size}
            done = json_bytes(record)
            write_new_file(tmp / DONE_FILE, lambda f: f.write(done))
            fsync_dir(tmp)
            fault("shard-done")
            self._install(tmp, i)
        except BaseException:
            remove(tmp)
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
        start = shard_index(start)
        return [self.link_shard_from(version, j, start + j) for j in range(version.n_shards)]

    def link_shard_from(self, version: Version, j: int, i: int) -> int:
        """Hard-link (or copy, where links fail) shard `j` of a published version into this build as shard `i`
        (replacing one there); returns `i`. `index sync` links the shards whose rows did not change.

        Raises:
            IndexCorruptError: shard `j` of `version` is incomplete (its files do not match its _DONE.json).
        """
        self._check_open()
        i = shard_index(i)
        src = version.path / SHARDS_DIR / shard_name(j)
        record, why = check_shard(src, verify=False)
        if record is None:
            raise IndexCorruptError(f"{version._rel(f'{SHARDS_DIR}/{shard_name(j)}')}: {why}; "
                                    "restore or rebuild that version")
        tmp = self.path / SHARDS_DIR / f"{TMP_PREFIX}{shard_name(i)}-{os.getpid()}"
        remove(tmp)
        tmp.mkdir()
        try:
            for fname in sorted(record["files"]) + [DONE_FILE]:
                try:
                    os.link(src / fname, tmp / fname)
                except OSError:  # another file system, or links not allowed: copy instead
                    with open(src / fname, "rb") as fsrc:
                        write_new_file(tmp / fname, lambda f: shutil.copyfileobj(fsrc, f, HASH_BLOCK))
                fault("link-file")
            fsync_dir(tmp)
            self._install(tmp, i)
        except BaseException:
            remove(tmp)
            raise
        self._done[i] = record
        return i

    def _install(self, tmp: Path, i: int) -> None:
        """Rename a complete shard directory `tmp` to shards/<i>, moving an existing one aside first."""
        shards = tmp.parent
        dest = shards / shard_name(i)
        self._done.pop(i, None)
        aside = None
        if dest.exists():
            aside = shards / f"{TMP_PREFIX}old-{shard_name(i)}-{os.getpid()}"
            remove(aside)
            os.rename(dest, aside)
        os.rename(tmp, dest)
        fsync_dir(shards)
        if aside is not None:
            remove(aside)

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
        return np.load(self.path / SHARDS_DIR / shard_name(i) / f"{name}.npy", mmap_mode="r",
                       allow_pickle=False)

    def _done_record(self, i: int) -> dict:
        self._check_open()
        i = shard_index(i)
        if i not in self._done:
            raise ConfigError(f"shard {i} of build {self.key!r} is not done (done: {self.done_shards()})")
        return self._done[i]

    # --- global files -------------------------------------------------------------------------------

    def has_file(self, name: str) -> bool:
        """Whether global file `name` was written (e.g. to skip recomputing it on resume)."""
        self._check_open()
        return (self.path / check_global_name(name)).is_file()

    def read_array(self, name: str) -> np.ndarray:
        """Global array file `name` written by `put_array`, memory-mapped read-only."""
        self._check_open()
        return np.load(self.path / check_global_name(name), mmap_mode="r", allow_pickle=False)

    def read_json(self, name: str) -> Any:
        """The content of global JSON file `name` written by `put_json`."""
        self._check_open()
        return json.loads((self.path / check_global_name(name)).read_bytes().decode("utf-8"))

    def put_array(self, name: str, arr: Any) -> None:
        """Write a global array file atomically, e.g. put_array("projection.npy", P).

        Args:
            name: a safe file name ending in ".npy".
            arr: the array (no object or structured dtype).
        """
        self._check_open()
        check_global_name(name)
        if not name.endswith(".npy"):
            raise ConfigError(f"global array file name {name!r} must end in .npy")
        arr = check_array(name, arr, "global array")
        write_atomic(self.path / name, npy_writer(arr))

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write a global file of raw bytes atomically, e.g. put_bytes("index.faiss", serialized)."""
        self._check_open()
        check_global_name(name)
        data = bytes(data)
        write_atomic(self.path / name, lambda f: f.write(data))

    def put_stream(self, name: str, write: Callable[[BinaryIO], None]) -> None:
        """Write a global file atomically from `write(f)`, which fills the binary file `f` (e.g. a FAISS index
        streamed by `SketchIndex.write`, too large to hold as bytes)."""
        self._check_open()
        check_global_name(name)
        write_atomic(self.path / name, write)

    def link_global_from(self, version: Version, name: str) -> None:
        """Hard-link (or copy, where links fail) global file `name` of a published version into this build,
        atomically (e.g. a new version that shares its base's maps and FAISS file: deletion.py)."""
        self._check_open()
        check_global_name(name)
        src = version.global_file(name)
        tmp = self.path / f"{TMP_PREFIX}{name}-{os.getpid()}"
        remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy instead
            with open(src, "rb") as fsrc:
                write_new_file(tmp, lambda f: shutil.copyfileobj(fsrc, f, HASH_BLOCK))
        os.replace(tmp, self.path / name)
        fsync_dir(self.path)

    def put_json(self, name: str, obj: Any) -> None:
        """Write a global JSON file atomically (canonical form: sorted keys, UTF-8, no NaN)."""
        self._check_open()
        check_global_name(name)
        try:
            data = json_bytes(obj)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"global JSON file {name!r}: content is not JSON-serialisable: {exc}") from exc
        write_atomic(self.path / name, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------- version


def _shard_arrays(i: int, n: int, arrays: Mapping[str, Any], token_arrays: Mapping[str, Any] | None, offsets: Any
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict], int | None]:
    """(file name → array, array name → spec, token count or None) of shard `i`'s arrays, checked (see
    `Build.write_shard`)."""
    payload: dict[str, np.ndarray] = {}
    specs: dict[str, dict] = {}
    names = list(arrays) + list(token_arrays or {})
    if len(set(names)) != len(names):
        raise ConfigError(f"array names must be unique across arrays and token_arrays, got {names}")
    for name, arr in arrays.items():
        arr = check_array(check_array_name(name), arr, "array")
        if arr.shape[0] != n:
            raise DataError(f"array {name!r} has {arr.shape[0]} rows but shard {i} has {n} metadata rows")
        payload[f"{name}.npy"] = arr
        specs[name] = {"kind": "sample", "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if (token_arrays is None) != (offsets is None):
        raise ConfigError("token_arrays and offsets go together: give both or neither")
    if offsets is None:
        return payload, specs, None
    off = np.asarray(offsets)
    if off.dtype.kind not in "iu" or off.shape != (n + 1,):
        raise DataError(f"offsets of shard {i} must be (n + 1,) = ({n + 1},) integers, got {off.shape} {off.dtype}")
    off = off.astype(np.int64)
    if off[0] != 0 or (np.diff(off) < 0).any():
        raise DataError(f"offsets of shard {i} must start at 0 and never decrease")
    tokens = int(off[-1])
    payload[OFFSETS_FILE] = off
    for name, arr in token_arrays.items():
        arr = check_array(check_array_name(name), arr, "token array")
        if arr.shape[0] != tokens:
            raise DataError(f"token array {name!r} has {arr.shape[0]} rows but offsets[-1] = {tokens}")
        payload[f"{name}.npy"] = arr
        specs[name] = {"kind": "token", "dtype": arr.dtype.str, "shape": list(arr.shape)}
    return payload, specs, tokens


def _metadata_lines(i: int, rows: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """Shard `i`'s metadata rows as JSONL lines (UTF-8, no ASCII escaping, NaN refused)."""
    lines = []
    for j, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"metadata row {j} of shard {i} is a {type(row).__name__}, not a JSON object", row=j)
        try:
            lines.append(json.dumps(dict(row), ensure_ascii=False, allow_nan=False,
                                    separators=(",", ":")).encode() + b"\n")
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogates) is a ValueError
            raise DataError(f"metadata row {j} of shard {i} is not JSON-serialisable: {exc}", row=j) from exc
    return lines
