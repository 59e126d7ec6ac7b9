"""A published index version: immutable, verified against its manifest, read by row or token."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError, IndexCorruptError, IndexMismatchError
from .files import sha256_file
from .store_format import (
    MANIFEST_FILE, METADATA_FILE, OFFSETS_FILE, ROWINDEX_FILE, SHARDS_DIR, SIGNATURE_FILE, VERSIONS_DIR, RootLike,
    check_global_name, check_signature, group_positions, locate_rows, parse_manifest, shard_name, walk_files,
)


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

    def __init__(self, root: RootLike, name: str, path: Path, manifest: dict):
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
    def _open(cls, root: RootLike, name: str, path: Path, verify: bool) -> Version:
        rel = f"{VERSIONS_DIR}/{name}/{MANIFEST_FILE}"
        try:
            raw = (path / MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            raise IndexCorruptError(f"{rel}: missing; restore or rebuild this version") from None
        version = cls(root, name, path, parse_manifest(raw, rel))
        if getattr(root, "signing_key", None) is not None:
            check_signature(root.signing_key, raw, path / SIGNATURE_FILE, rel)
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
        for rel, _ in walk_files(self.path):
            if rel not in (MANIFEST_FILE, SIGNATURE_FILE) and rel not in files:
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
                    rel = f"{SHARDS_DIR}/{shard_name(s)}/{name}.npy"
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
            rel = f"{SHARDS_DIR}/{shard_name(s)}/{fname}"
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
        return locate_rows(self.row_starts, self._indices(global_indices))

    def take(self, name: str, global_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of the per-sample array `name` for the given global rows, in that order: (k, ...)."""
        spec = self._spec(name)
        if spec["kind"] != "sample":
            raise ConfigError(f"array {name!r} is per-token; use token_rows")
        shard, local = self.locate(global_indices)
        maps = self.shard_arrays(name)
        out = np.empty((shard.size, *spec["shape"]), dtype=np.dtype(spec["dtype"]))
        for s, pos in group_positions(shard):
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
        groups = list(group_positions(shard))
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
        tok_groups = list(group_positions(tok_shard))
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
                rel = f"{SHARDS_DIR}/{shard_name(s)}/{METADATA_FILE}"
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
        for s, pos in group_positions(shard):
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
                    rel = self._rel(f"{SHARDS_DIR}/{shard_name(s)}/{METADATA_FILE}")
                    raise IndexCorruptError(f"{rel}: row {j} is unreadable ({exc}); restore or rebuild this "
                                            "version") from exc
                out[p] = row
        return out  # type: ignore[return-value]

    # --- global files -------------------------------------------------------------------------------

    def global_file(self, name: str) -> Path:
        """The path of global file `name` (e.g. "index.faiss"), which the manifest must list."""
        check_global_name(name)
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
