"""A client-only install (`pip install forvalue`, no engine extra): the client and the CLI's --server commands
work without torch, transformers or faiss; commands that run a model say what to install."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BLOCKED = ("torch", "transformers", "faiss", "gguf", "accelerate", "tqdm", "grpc_reflection", "prometheus_client")

# a meta-path finder that makes the engine's packages uninstalled for this interpreter
PRELUDE = f"""
import sys
class _Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Uninstalled())
"""


def run_without_engine(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code, *args], capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks():
    r = run_without_engine("import torch")
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_query_and_rank_through_a_server_need_no_engine(influence_server, local_index, tmp_path):
    cli = "from forvalue.client.cli import main; main()"
    r = run_without_engine(cli, "query", "--server", influence_server.address, "--prompt", "Reverse: red sun ->",
                           "--response", " sun red", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = local_index.search([("Reverse: red sun ->", " sun red")], k=3)
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]

    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"prompt": "Upper: cat ->", "response": " CAT"}) + "\n")
    out = tmp_path / "scores.jsonl"
    r = run_without_engine(cli, "rank", "--server", influence_server.address, "--valuation", str(val),
                           "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == local_index.n


@pytest.mark.parametrize("args", [["eval", "x.jsonl"], ["index", "build", "--data", "x.jsonl", "--index", "idx"]])
def test_model_commands_name_the_engine_extra(tmp_path, args):
    (tmp_path / "x.jsonl").write_text(json.dumps({"prompt": "a", "response": " b", "label": "x",
                                                  "split": "train"}) + "\n")
    r = subprocess.run([sys.executable, "-c", PRELUDE + "from forvalue.client.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "forvalue[engine" in r.stderr and len(r.stderr.strip().splitlines()) == 1
