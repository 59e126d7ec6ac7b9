"""Nothing from a corpus becomes a path: hostile ids and metadata stay data (written nowhere but the index
directory, read back unchanged); and no module of forvalue can unpickle (no pickle, no torch.load, every
np.load with allow_pickle=False)."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from forvalue.client.cli import main
from forvalue.indexer.index import Index
from forvalue.indexer.store import IndexRoot

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("indexer", "server", "client")

HOSTILE_IDS = [
    "../../etc/passwd", "/abs/path", "a/../../b", "..", ".", "./", "~/x", "$HOME/x", "C:\\Windows\\win.ini",
    "\\\\server\\share", "%2e%2e%2fescape", "CON", "nul.txt", "-rf", "*", "a b\tc", "line\nbreak\rreturn",
    "\u2028sep\u2029", "é/../ñ", "\u202eevil.npy", "名前/../データ", "🙂/🙃", "x" * 300, ".tmp-000000-1",
    "CURRENT", "manifest.json", "shards/000000/_DONE.json", "versions/v000009",
]


def tree(top: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under `top` but `skip`: relative path -> (kind, size, mtime_ns); a directory's changes show
    as changes of its entries."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        out.update({str((here / d).relative_to(top)): ("dir",) for d in dirnames})
        for name in filenames:
            st = (here / name).lstat()
            out[str((here / name).relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def test_hostile_ids_and_metadata_stay_inside_the_index_and_round_trip(tmp_path, served_model_dir, served_lm,
                                                                        monkeypatch):
    rows = [{"id": sid, "prompt": f"Upper: {sid} ->", "response": f" answer {i}", "label": ["../x", "/y"][i % 2],
             "../../meta_escape": sid, "/abs/meta": i, "nested": {"../k": [sid, "/etc/shadow"]}}
            for i, sid in enumerate(HOSTILE_IDS)]
    data = tmp_path / "hostile.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "deep" / "er" / "idx"
    out.parent.mkdir(parents=True)
    cwd = tmp_path / "cwd" / "a" / "b"  # a relative escape from the working directory lands in the snapshot
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    top = tmp_path.parent  # this session's whole temporary tree
    before = tree(top, out)
    assert not Path("/abs").exists()

    r = CliRunner().invoke(main, ["index", "build", "--data", str(data), "--index", str(out), "--model",
                                  served_model_dir, "--dim", "64", "--rank", "4", "--shard-size", "7",
                                  "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert tree(top, out) == before  # nothing written, changed or removed outside the index directory
    assert not Path("/abs").exists()
    safe = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9._-]*$")
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert names and all(safe.fullmatch(part) for n in names for part in n.split("/")), names
    assert not [n for n in names if "passwd" in n or "abs" in n or "escape" in n]

    with IndexRoot(out).load(verify=True) as v:
        stored = v.rows(np.arange(v.n))
    assert [s["id"] for s in stored] == HOSTILE_IDS
    for s, row in zip(stored, rows):
        assert s["meta"] == {k: row[k] for k in ("../../meta_escape", "/abs/meta", "nested")}
        assert (s["prompt"], s["response"], s["label"]) == (row["prompt"], row["response"], row["label"])
    index = Index.open(str(out), served_lm)
    hits = index.search([("Upper: ../../etc/passwd ->", " answer 0")], k=len(HOSTILE_IDS)).hits
    assert sorted(h.id for h in hits) == sorted(HOSTILE_IDS)
    assert all(h.metadata == stored[h.row] for h in hits)


# --- no unpickling anywhere -------------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def unpickling(source: str, filename: str = "<source>") -> list[str]:
    """Where `source` imports a pickle module, calls torch.load, or calls np.load without allow_pickle=False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if module in ("numpy", "torch") and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from {node.module} import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner = owner.id if isinstance(owner, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                found.append(f"{where}: torch.load")
            elif owner in ("np", "numpy") and node.func.attr == "load":
                flag = kw.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}: np.load without allow_pickle=False")
            elif node.func.attr in ("read_pickle", "loads") and owner in {"pd", "pandas"} | PICKLE_MODULES:
                found.append(f"{where}: {owner}.{node.func.attr}")
    return found


@pytest.mark.parametrize("source, bad", [
    ("import pickle", True), ("from joblib import load", True), ("import dill.settings", True),
    ("torch.load(p)", True), ("torch.load(p, weights_only=True)", True), ("from torch import load", True),
    ("np.load(p)", True), ("np.load(p, allow_pickle=True)", True), ("numpy.load(p, mmap_mode='r')", True),
    ("pd.read_pickle(p)", True),
    ("np.load(p, mmap_mode='r', allow_pickle=False)", False), ("np.save(f, a, allow_pickle=False)", False),
    ("json.loads(s)", False), ("safetensors.torch.load_file(p)", False),
])
def test_the_unpickling_check_finds_what_it_looks_for(source, bad):
    assert bool(unpickling(source)) == bad


def test_no_module_can_unpickle():
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 20 and REPO / "indexer" / "store.py" in files
    found = [hit for p in files for hit in unpickling(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, found
    loads = sum(len(re.findall(r"\bnp\.load\(", p.read_text(encoding="utf-8"))) for p in files)
    assert loads >= 3  # the store's reads were seen, and each passes allow_pickle=False


SECRET = "hunter2-this-must-never-be-printed"


@pytest.fixture
def index_copy(tmp_path, served_index):
    import shutil

    root = tmp_path / "idx"
    shutil.copytree(served_index[0], root)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET + "\n")
    return root, secret


def test_a_symlinked_current_is_refused_without_echoing_its_target(index_copy, served_model_dir):
    root, secret = index_copy
    (root / "CURRENT").unlink()
    (root / "CURRENT").symlink_to(secret)
    runner = CliRunner()
    for args in (["index", "info", "--index", str(root)], ["index", "gc", "--index", str(root), "--keep", "1"],
                 ["query", "--index", str(root), "--model", served_model_dir, "--response", " x"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 2, (args, r.output)
        assert SECRET not in r.output and "symbolic link" in r.output, (args, r.output)
    assert secret.read_text() == SECRET + "\n"  # nothing written through the link either


def test_a_current_holding_other_bytes_is_not_echoed(index_copy):
    root, _ = index_copy
    (root / "CURRENT").write_text(SECRET + "\n" + "x" * 500)
    r = CliRunner().invoke(main, ["index", "info", "--index", str(root)])
    assert r.exit_code == 2 and SECRET not in r.output and "not a version name" in r.output, r.output


def test_a_version_linked_out_of_the_index_is_refused(index_copy):
    import shutil

    root, secret = index_copy
    outside = secret.parent / "elsewhere"
    shutil.copytree(root / "versions" / "v000001", outside)
    (root / "versions" / "v000002").symlink_to(outside)
    r = CliRunner().invoke(main, ["index", "info", "--index", str(root)])
    assert r.exit_code == 2 and "symbolic link" in r.output and str(outside) not in r.output, r.output
