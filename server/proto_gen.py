"""Python code for the service protocol, generated from proto/forvalue/v1/*.proto on first use.

The generated modules (`influence_pb2.py` with its `.pyi` stubs, `influence_pb2_grpc.py`) are a build
product, never committed or edited: `ensure_generated()` runs grpc_tools.protoc into `server/generated/`
(the package `forvalue.server.generated`) when that folder is missing or was generated from another
version of the .proto files or of grpcio-tools. protoc's `from forvalue.v1 import x_pb2` lines become
relative imports, so the generated code claims no top-level name and works from the editable install.

Concurrent first imports are safe: generation runs under an exclusive lock on `generated/.lock`, writes
into a temporary folder beside the package, and moves each file into place with an atomic rename, the
stamp (what the code was generated from) last. Readers that find a matching stamp never take the lock.

`python -m forvalue.server.proto_gen` regenerates explicitly (e.g. in a read-only deployment's build).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from forvalue.indexer.files import TMP_PREFIX, write_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "proto"
GENERATED_DIR = PACKAGE_DIR / "generated"
PROTO_PACKAGE = "forvalue/v1"  # proto files under PROTO_ROOT/PROTO_PACKAGE; generated flat into GENERATED_DIR
STAMP_FILE = "STAMP.json"
LOCK_FILE = ".lock"
_KEEP = {STAMP_FILE, LOCK_FILE, "__pycache__"}

# protoc writes `from forvalue.v1 import influence_pb2 as ...` for imports between our own proto files
_OWN_IMPORT = re.compile(r"^from forvalue\.v1 import (\w+_pb2)\b", re.MULTILINE)

_INIT = '"""Generated from proto/forvalue/v1 by forvalue.server.proto_gen; do not edit, not committed."""\n'


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto files of the protocol, relative to `proto_root`, sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PROTO_PACKAGE).glob("*.proto"))


def _tools_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("grpcio-tools")
    except Exception:  # not installed: generated code is used as it is, if its .proto digest matches
        return None


def wanted_stamp(proto_root: Path = PROTO_ROOT) -> dict:
    """What generated code must have been made from: sha256 of every .proto file, the grpcio-tools version."""
    digest = hashlib.sha256()
    for rel in proto_files(proto_root):
        digest.update(str(rel).encode() + b"\0" + (proto_root / rel).read_bytes() + b"\0")
    return {"proto_sha256": digest.hexdigest(), "grpcio_tools": _tools_version()}


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(out_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> bool:
    """Whether `out_dir` holds code generated from the current .proto files (and grpcio-tools, if installed).

    Without the .proto sources (an installed copy without the repository) any stamped folder is current.
    """
    have = _read_stamp(out_dir)
    if have is None:
        return False
    if not (proto_root / PROTO_PACKAGE).is_dir():
        return True
    want = wanted_stamp(proto_root)
    if have.get("proto_sha256") != want["proto_sha256"]:
        return False
    return want["grpcio_tools"] is None or have.get("grpcio_tools") == want["grpcio_tools"]


def _protoc(proto_root: Path, tmp: Path) -> None:
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise ImportError("generating the forvalue protocol code needs grpcio-tools: pip install grpcio-tools") from exc
    import importlib.resources

    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={tmp}", f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}", *map(str, proto_files(proto_root))]
    if protoc.main(args) != 0:
        raise ImportError(f"grpc_tools.protoc failed on {proto_root / PROTO_PACKAGE} (its message is above)")


def generate(out_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> None:
    """Generate the protocol code into `out_dir` unconditionally (the caller holds the lock).

    Raises:
        ImportError: no .proto files, grpcio-tools missing, or protoc failed.
    """
    if not proto_files(proto_root):
        raise ImportError(f"no .proto files under {proto_root / PROTO_PACKAGE}; reinstall forvalue (the wheel "
                          "ships them as forvalue/proto) or install from a source checkout (pip install -e .)")
    stamp = wanted_stamp(proto_root)
    tmp = Path(tempfile.mkdtemp(prefix=".generated-", dir=out_dir.parent))
    try:
        _protoc(proto_root, tmp)
        made = tmp / PROTO_PACKAGE
        files = {}
        for src in sorted(made.iterdir()):
            text = src.read_text()
            files[src.name] = _OWN_IMPORT.sub(r"from . import \1", text)
            if re.search(r"^\s*(from|import) forvalue\.v1\b", files[src.name], re.MULTILINE):
                raise ImportError(f"{src.name}: generated code still imports forvalue.v1; update proto_gen")
        files["__init__.py"] = _INIT
        for name, text in files.items():
            write_atomic(out_dir / name, lambda f, text=text: f.write(text.encode()))
        for old in out_dir.iterdir():  # modules of .proto files that are gone
            if old.name not in files and old.name not in _KEEP and not old.name.startswith(TMP_PREFIX):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        # last: readers trust a matching stamp
        write_atomic(out_dir / STAMP_FILE, lambda f: f.write((json.dumps(stamp, indent=1) + "\n").encode()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    importlib.invalidate_caches()  # the import system caches directory listings


def ensure_generated(out_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> Path:
    """Make sure `out_dir` holds current generated code, generating it under a file lock if not.

    Returns:
        `out_dir`.

    Raises:
        ImportError: the code is missing or stale and cannot be generated (no write access to the folder,
            grpcio-tools missing, no .proto sources); the message says what to do.
    """
    if is_current(out_dir, proto_root):
        return out_dir
    with _locked(out_dir):
        if not is_current(out_dir, proto_root):  # another process may have finished while we waited
            generate(out_dir, proto_root)
    return out_dir


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive `out_dir/.lock` (blocking), creating `out_dir` if needed."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ImportError(f"cannot generate the forvalue protocol code into {out_dir} ({exc.strerror}); run "
                          "`python -m forvalue.server.proto_gen` as a user who can write there") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def main() -> None:
    """Regenerate the protocol code now and print where it went."""
    with _locked(GENERATED_DIR):
        generate()
    print(f"generated {sorted(p.name for p in GENERATED_DIR.glob('*.py*'))} in {GENERATED_DIR}")


if __name__ == "__main__":
    main()
