"""Deletions (takedowns): new versions in which given training samples are never returned.

`delete_samples(root, ids)` publishes a version that shares every shard of the current one (hard links,
no forward pass) and adds the global file `deleted.json`:

    {"ids": [...every id ever taken down from this index, sorted...],
     "rows": [...rows of this version holding one of them, sorted...]}

`Index` never returns a row listed in "rows" (search, score-all, group-by). The "ids" list is the
takedown record: every later build or add on this root reads it from the current version, leaves those
samples out of its input (they are then physically gone from the new version's shards) and carries the
list forward, so a takedown survives rebuilds. Old versions keep their copies until `index gc` removes
them.

Takedowns and the last step of a build (read the record, publish) hold DIR/.takedown.lock, so a build
that finishes while a deletion runs cannot publish a version that forgets it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ConfigError, DataError, IndexCorruptError, UnknownIdsError
from .filters import FieldIndex
from .store import IndexRoot, Version
from .store_format import STORE_KEYS

DELETED_FILE = "deleted.json"
TAKEDOWN_LOCK = ".takedown.lock"


@dataclass(frozen=True)
class Deleted:
    """The takedown state of one version: ids ever taken down, and rows of this version hidden."""

    ids: frozenset[str]
    rows: np.ndarray  # sorted int64

    @classmethod
    def none(cls) -> Deleted:
        return cls(frozenset(), np.zeros(0, dtype=np.int64))


def deleted_of(version: Version) -> Deleted:
    """What `version` has taken down (nothing for a version without deleted.json)."""
    if DELETED_FILE not in version.manifest.get("files", {}):
        return Deleted.none()
    raw = version.global_json(DELETED_FILE)
    ok = (isinstance(raw, dict) and isinstance(raw.get("ids"), list) and isinstance(raw.get("rows"), list)
          and all(isinstance(i, str) for i in raw["ids"])
          and all(isinstance(r, int) and 0 <= r < version.n for r in raw["rows"]))
    if not ok:
        raise IndexCorruptError(f"{version._rel(DELETED_FILE)}: expected {{'ids': [str], 'rows': [row numbers]}}; "
                                "restore or rebuild this version")
    return Deleted(frozenset(raw["ids"]), np.unique(np.asarray(raw["rows"], dtype=np.int64)))


def current_takedowns(root: IndexRoot) -> frozenset[str]:
    """The takedown record of the root's current version (empty when nothing is published)."""
    if root.current() is None:
        return frozenset()
    with root.load(verify=False) as v:
        return deleted_of(v).ids


def takedown_lock(root: IndexRoot) -> contextlib.AbstractContextManager[None]:
    """Hold DIR/.takedown.lock (exclusive, blocking) for the block."""
    return root.locked(TAKEDOWN_LOCK)


def hidden_rows(row_ids: Sequence[str], takedowns: Iterable[str]) -> np.ndarray:
    """Rows (sorted int64) whose id is in `takedowns`."""
    gone = set(takedowns)
    return np.asarray([r for r, i in enumerate(row_ids) if i in gone], dtype=np.int64)


def deleted_json(takedowns: Iterable[str], rows: np.ndarray) -> dict:
    return {"ids": sorted(set(takedowns)), "rows": [int(r) for r in np.unique(rows)]}


def read_id_file(path: str | os.PathLike) -> list[str]:
    """Ids to delete from a file: one per line (blank lines and lines starting with # skipped), or JSON
    lines with an "id" field.

    Raises:
        DataError: naming the file and line.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the id file: {exc}", path=str(p)) from exc
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg})", path=str(p), row=n) from exc
            value = obj.get("id") if isinstance(obj, dict) else None
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise DataError('a JSON line needs an "id" (string or int)', path=str(p), row=n)
            line = str(value)
        out.append(line)
    if not out:
        raise DataError("holds no ids (one id per line, or JSON lines with an \"id\")", path=str(p))
    return out


@dataclass(frozen=True)
class DeleteResult:
    """What `delete_samples` did.

    Attributes:
        version: the version now current (the new one; the old one when nothing was new).
        base: the version the deletion started from.
        deleted: ids newly hidden by this call. already: ids that were deleted before.
        unknown: ids found in no row of the index (only with missing="ignore").
        hidden_rows: rows hidden in `version` in all.
    """

    version: str
    base: str
    deleted: list[str]
    already: list[str]
    unknown: list[str]
    hidden_rows: int

    @property
    def published(self) -> bool:
        return self.version != self.base


def delete_samples(root: str | os.PathLike, ids: Sequence[str], missing: str = "error") -> DeleteResult:
    """Publish a version of `root` in which the samples `ids` are never returned (see the module doc).

    Args:
        ids: training sample ids.
        missing: "error" (default): an id found in no row refuses the whole call, nothing is written;
            "ignore": such ids are reported in `unknown` and still recorded as taken down, so a later
            add or rebuild never brings them in.

    Raises:
        DataError: unknown ids with missing="error", or nothing published yet. ConfigError: bad arguments.
    """
    if missing not in ("error", "ignore"):
        raise ConfigError(f"missing must be 'error' or 'ignore', got {missing!r}")
    ids = [str(i) for i in ids]
    if not ids:
        raise ConfigError("no ids to delete")
    idx_root = IndexRoot(root)
    with takedown_lock(idx_root):
        base = idx_root.load(verify=False)
        with base:
            before = deleted_of(base)
            codes, keys = FieldIndex(base.rows, base.n).codes("id")
            row_of_key = {k: c for c, k in enumerate(keys)}
            unknown = sorted({i for i in ids if i not in row_of_key})
            if unknown and missing == "error":
                shown = ", ".join(repr(u) for u in unknown[:5])
                raise UnknownIdsError(f"{len(unknown)} id(s) are in no row of index version {base.name}: {shown}"
                                f"{' ...' if len(unknown) > 5 else ''}; nothing was deleted (check the ids, or pass "
                                "--missing ignore to record them as taken down anyway)", path=str(idx_root.path))
            wanted = set(ids)
            already = sorted(wanted & before.ids)
            new = sorted(wanted - before.ids)
            if not new:
                return DeleteResult(base.name, base.name, [], already, unknown, int(before.rows.size))
            takedowns = before.ids | wanted
            hit = np.isin(codes, np.asarray([c for c, k in enumerate(keys) if k in takedowns], dtype=np.int32))
            rows = np.union1d(before.rows, np.flatnonzero(hit)).astype(np.int64)
            key_src = json.dumps({"base": base.name, "takedowns": sorted(takedowns)}, sort_keys=True)
            build = idx_root.open_build("delete-" + hashlib.sha256(key_src.encode()).hexdigest()[:20])
            if len(build.done_shards()) != base.n_shards:
                build.link_shards_from(base, 0)
            for name in base.manifest["files"]:
                if "/" not in name and name != DELETED_FILE:
                    build.link_global_from(base, name)
            build.put_json(DELETED_FILE, deleted_json(takedowns, rows))
            manifest = {k: v for k, v in base.manifest.items() if k not in STORE_KEYS}
            manifest.update(base_version=base.name, operation="delete", forvalue_version=__version__,
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            deleted={"ids": len(takedowns), "rows": int(rows.size)})
            name = idx_root.publish(build, manifest, expect_current=base.name)
    return DeleteResult(name, base.name, new, already, unknown, int(rows.size))
