"""The influence-index directory: its root (CURRENT, the lock, publishing, gc) and the layout every store module
shares. The roles: store.py (the root; `ShardWriter`, a worker's view of a build), store_build.py (`Build`: a
resumable build in progress), store_version.py (`Version`: a published version, read by row or token),
store_format.py (names and the checks of manifests and shards), files.py (crash-safe writes, hashes, faults).

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
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, IndexChangedError, IndexCorruptError, IndexMismatchError
from .files import (
    SAFE_NAME, check_safe_name, excerpt, fault, fsync_dir, remove, sha256_file, write_atomic, write_new_file,
)
from .store_format import (
    BUILDS_DIR, CURRENT_FILE, DONE_FILE, FORMAT_VERSION, LOCK_FILE, MANIFEST_FILE, SHARDS_DIR, SIGNATURE_FILE,
    TRASH_PREFIX, VERSIONS_DIR, VERSION_NAME, manifest_bytes, manifest_signature, parse_manifest, parse_shard_name,
    shard_schema, signing_key_from_env, version_name, walk_files,
)
from .store_build import Build
from .store_version import Version

ANY = object()  # publish(expect_current=ANY): whatever CURRENT is; IndexRoot(signing_key=ANY): from the environment
__all__ = ["IndexRoot", "Build", "ShardWriter", "Version"]  # the store's roles: root (here), builds, versions


class IndexRoot:
    """An index root directory: its published versions, the CURRENT pointer, and builds in progress.

    Creating an IndexRoot touches nothing on disk; reading (`current`, `versions`, `load`) needs no write
    access.

    Args:
        path: the index root directory (need not exist yet).
    """

    def __init__(self, path: str | os.PathLike, signing_key: bytes | None | object = ANY):
        """`signing_key`: published versions get a signature (HMAC of the manifest) and only versions signed
        with it are read; ANY (default) = the key in FORVALUE_SIGNING_KEY_FILE, if set; None = no signing."""
        self.path = Path(path)
        self.signing_key = signing_key_from_env() if signing_key is ANY else signing_key

    def __repr__(self) -> str:
        return f"IndexRoot({str(self.path)!r})"

    # --- reading ------------------------------------------------------------------------------------

    def current(self) -> str | None:
        """The name of the current version, or None when no version was ever published.

        Raises:
            IndexCorruptError: CURRENT does not hold a version name (e.g. "../evil") or names a version
                that does not exist.
        """
        path = self.path / CURRENT_FILE
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise IndexCorruptError(f"{CURRENT_FILE}: is a symbolic link or not a plain file (refused, not followed); "
                                    "an index holds only plain files: point it at a published version with "
                                    "set_current")
        try:
            with open(path, "rb") as f:
                raw = f.read(64)  # a version name is a few bytes: never read (or echo) more of a strange file
        except FileNotFoundError:
            return None
        try:
            name = version_name(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ConfigError) as exc:
            raise IndexCorruptError(f"{CURRENT_FILE}: holds {excerpt(raw)}, not a version name like v000001; "
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
        names = [p.name for p in vdir.iterdir() if VERSION_NAME.fullmatch(p.name) and p.is_dir()]
        for name in names:
            if (vdir / name).is_symlink():  # a version is a directory of the index, never a link out of it
                raise IndexCorruptError(f"{VERSIONS_DIR}/{name}: is a symbolic link (refused, not followed); an "
                                        "index holds only plain files and directories: remove it")
        return sorted(names, key=lambda s: int(s[1:]))

    def version_dir(self, name: str) -> Path:
        """The directory of version `name` (checked to be a version name; it may not exist)."""
        return self.path / VERSIONS_DIR / version_name(name)

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
            if parse_manifest(raw, rel).get("build_key") == build_key:
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

    def publish(self, build: Build, manifest: Mapping[str, Any], expect_current: str | None | object = ANY) -> str:
        """Turn a complete build into the next immutable version and make it current.

        Steps: check shards 0..n-1 are all done and agree on their arrays; hash every file of the build;
        write manifest.json (the caller's fields plus format_version, build_key, n_rows, shards, arrays,
        files, manifest_sha256 — the store's keys overwrite the caller's); then, under DIR/.lock, check that
        CURRENT is still `expect_current`, rename the build to versions/<next name> and switch CURRENT (a
        compare-and-swap: an update that started from an older CURRENT never hides what another published
        meanwhile). The build is closed afterwards.

        Args:
            build: an open build of this root.
            manifest: JSON-able fields to record (model fingerprint, sketch parameters, seed, ...).
            expect_current: the CURRENT the build started from (None: there was none); ANY = do not check.

        Returns:
            The new version's name.

        Raises:
            DataError: the build has no shards, a gap in its shard numbers, or unexpected files.
            IndexMismatchError: shards disagree on array names, dtypes or trailing shapes.
            IndexCorruptError: a shard file no longer matches the checksum it was written with.
            ConfigError: `manifest` is not JSON-able, or `build` belongs to another root.
            IndexChangedError: CURRENT moved away from `expect_current` while the build ran (nothing is
                published; the build stays, so a rerun from the new CURRENT resumes what it can).
        """
        build._check_open()
        if build.root.path.resolve() != self.path.resolve():
            raise ConfigError(f"build {build.path} belongs to another index root than {self.path}")
        try:
            body = json.loads(json.dumps(dict(manifest), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"manifest fields must be JSON-serialisable (no NaN): {exc}") from exc
        records, schema = _shard_records(build)
        body.update(
            format_version=FORMAT_VERSION,
            build_key=build.key,
            n_rows=sum(r["rows"] for r in records),
            shards=[{"rows": r["rows"], "tokens": r["tokens"]} for r in records],
            arrays=schema,
            files=_hash_files(build),
        )
        raw = manifest_bytes(body)
        write_atomic(build.path / MANIFEST_FILE, lambda f: f.write(raw))
        if self.signing_key is not None:
            sig = manifest_signature(self.signing_key, raw)
            write_atomic(build.path / SIGNATURE_FILE, lambda f: f.write(sig))
        versions = self.path / VERSIONS_DIR
        versions.mkdir(exist_ok=True)
        fsync_dir(self.path)
        with self.locked():
            now = self.current()
            if expect_current is not ANY and now != expect_current:
                raise IndexChangedError(
                    f"{self.path}: CURRENT moved to {now} while this update ran (it started from "
                    f"{expect_current or 'an empty index'}); nothing was published. Run it again: it starts from "
                    f"{now}, and keeps what {now} added")
            name = self.next_version_name()
            dest = versions / name
            if dest.exists():  # only if someone bypassed the lock
                raise ConfigError(f"{dest} appeared while publishing; retry")
            os.rename(build.path, dest)
            fsync_dir(versions)
            fsync_dir(build.path.parent)
            fault("publish-rename")
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
        """Delete old versions, keeping the `keep` newest, the current one and every one newer than it (a
        roll-back's newer versions stay until CURRENT moves past them; publishing holds the same lock).

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
            current = self.current()
            newer = names[names.index(current) + 1 :] if current in names else []
            kept = set(names[-keep:]) | {current} | set(newer)
            for name in names:
                if name not in kept:
                    os.rename(versions / name, versions / f"{TRASH_PREFIX}{name}-{os.getpid()}")
                    removed.append(name)
                    fault("gc-trash")
            if versions.is_dir():
                fsync_dir(versions)
                for p in versions.iterdir():
                    if p.name.startswith(TRASH_PREFIX):
                        remove(p)
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
        write_new_file(tmp, lambda f: f.write(f"{name}\n".encode()))
        fault("current-tmp")
        os.replace(tmp, self.path / CURRENT_FILE)
        fault("current-replaced")
        fsync_dir(self.path)


# ------------------------------------------------------------------------------------------------ build


def _shard_records(build: Build) -> tuple[list[dict], dict]:
    """(the `_DONE` records of shards 0..n-1, their common array schema) of a build about to be published.

    Raises:
        DataError: no shards, or a gap in their numbers. IndexMismatchError: shards disagree on their arrays.
    """
    done = build.done_shards()
    if not done:
        raise DataError("the build has no shards; write at least one before publishing", path=str(build.path))
    missing = sorted(set(range(done[-1] + 1)) - set(done))
    if missing:
        raise DataError(f"shards {missing} are missing (done: {done}); write them before publishing",
                        path=str(build.path))
    records = [build._done[i] for i in done]
    schema = shard_schema(records[0])
    for i, record in enumerate(records):
        if shard_schema(record) != schema:
            raise IndexMismatchError(f"shard {i} has arrays {shard_schema(record)} but shard 0 has {schema}; "
                                     "every shard of a version must have the same arrays")
    return records, schema


def _hash_files(build: Build) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file of a build (its manifest aside), each shard file checked
    against the checksum it was written with.

    Raises:
        DataError: a file that belongs to no done shard or is no global file. IndexCorruptError: a shard file
            changed since it was written.
    """
    files: dict[str, dict] = {}
    for rel, full in walk_files(build.path):
        if rel in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        parts = rel.split("/")
        if parts[0] == SHARDS_DIR:
            i = parse_shard_name(parts[1]) if len(parts) == 3 else None
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
    return files


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
