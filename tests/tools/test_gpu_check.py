"""tools/gpu_check.sh --dry-run: every command of the GPU check runs here, on the CPU, at toy sizes, and the
summary holds each step's result (the same script runs the real sizes on a GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = {"env": "cuda", "gpu_tests": "pytest", "index_05b": "ratio", "index_15b": "ratio",
         "serve": "throughput_vs_forward_limit", "firststage": "ms_per_query_both_directions_batched"}


def test_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_SECONDS": "560"}
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=620, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == summary
    for step, key in STEPS.items():
        assert summary[step]["rc"] == 0, (step, (tmp_path / f"{step}.log").read_text()[-2000:])
        assert key in (summary[step]["result"] or {}), (step, summary[step])
    assert summary["firststage"]["result"]["reference_agreement"] == 1.0
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back: at most 8 files
