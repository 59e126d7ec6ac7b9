"""Code generation of the protocol: first import from a fresh checkout, concurrency, staleness."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forvalue.server import proto_gen

REPO = Path(__file__).resolve().parents[2]

# Installs a copied server/ folder as forvalue.server (as the editable install maps the repository's), then
# imports the protocol: what the first `import forvalue.server.protocol` of a fresh clone does.
FIRST_IMPORT = """
import importlib.util, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("forvalue.server", root + "/server/__init__.py",
                                              submodule_search_locations=[root + "/server"])
mod = importlib.util.module_from_spec(spec)
sys.modules["forvalue.server"] = mod
spec.loader.exec_module(mod)
from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc
assert pb.__file__.startswith(root), pb.__file__
print(SERVICE_NAME, pb.DESCRIPTOR.name, pb.TopKRequest(k=3).k, hasattr(pb_grpc, "InfluenceStub"))
"""


def fresh_checkout(tmp_path: Path) -> Path:
    """The repository's server/ (without generated code) and proto/ folders, copied."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "server", root / "server",
                    ignore=shutil.ignore_patterns("generated", ".generated-*", "__pycache__"))
    shutil.copytree(REPO / "proto", root / "proto")
    return root


def test_generated_code_claims_no_top_level_name():
    from forvalue.server.protocol import SERVICE_NAME, pb, pb_grpc

    assert SERVICE_NAME == "forvalue.v1.Influence"
    assert pb.DESCRIPTOR.name == "forvalue/v1/influence.proto"  # registered under its proto path
    assert pb.__name__ == "forvalue.server.generated.influence_pb2"
    assert pb_grpc.__name__ == "forvalue.server.generated.influence_pb2_grpc"
    gen = Path(pb.__file__).parent
    assert (gen / "influence_pb2.pyi").is_file()
    for f in gen.glob("*.py*"):
        assert "forvalue.v1 import" not in f.read_text(), f
    assert "forvalue" not in sys.modules or not hasattr(sys.modules["forvalue"], "v1")
    assert proto_gen.is_current()


def test_fresh_checkout_generates_on_first_import_concurrently(tmp_path):
    root = fresh_checkout(tmp_path)
    assert not (root / "server" / "generated").exists()
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_IMPORT, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["forvalue.v1.Influence", "forvalue/v1/influence.proto", "3", "True"]
    gen = root / "server" / "generated"
    assert {p.name for p in gen.iterdir()} >= {"__init__.py", "influence_pb2.py", "influence_pb2.pyi",
                                                "influence_pb2_grpc.py", "STAMP.json"}
    assert not list((root / "server").glob(".generated-*")), "temporary folders left behind"
    assert proto_gen.is_current(gen, root / "proto")


def test_stale_code_is_regenerated_and_current_code_kept(tmp_path):
    root = fresh_checkout(tmp_path)
    out, protos = root / "server" / "generated", root / "proto"
    proto_gen.ensure_generated(out, protos)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proto_gen.ensure_generated(out, protos)  # current: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    proto = protos / "forvalue" / "v1" / "influence.proto"
    proto.write_text(proto.read_text().replace("message InfoRequest {}", "message InfoRequest {\n  string note = 1;\n}"))
    assert not proto_gen.is_current(out, protos)
    proto_gen.ensure_generated(out, protos)
    assert proto_gen.is_current(out, protos)
    assert b"note" in (out / "influence_pb2.py").read_bytes()
    assert json.loads((out / "STAMP.json").read_text()) == proto_gen.wanted_stamp(protos)


def test_no_sources_and_no_code_is_a_clear_import_error(tmp_path):
    with pytest.raises(ImportError, match="source checkout"):
        proto_gen.ensure_generated(tmp_path / "generated", tmp_path / "no-proto")
