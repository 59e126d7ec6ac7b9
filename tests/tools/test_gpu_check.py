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


def test_gpu_facts_dry_run_runs_every_job(tmp_path):
    """tools/gpu_facts.sh --dry-run: the fact-tracing jobs (three seeds with the issue's recipe, one with the
    CPU recipe) run at a toy size on the tiny model, and each writes its report as JSON."""
    from factories import make_model, make_tokenizer

    model_dir = tmp_path / "tiny"
    make_model(seed=0, layers=2, tie=True).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "MODEL": str(model_dir),
           "OMP_NUM_THREADS": "1", "JOB_SECONDS": "500"}
    env.pop("DATAINF", None)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_facts.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    status = dict(line.split(" rc=") for line in r.stdout.split("\n") if " rc=" in line)
    assert status == {"facts-s0": "0", "facts-s1": "0", "facts-s2": "0", "facts-light-s0": "0"}, r.stdout
    for name in status:
        report = json.loads((out / f"{name}.json").read_text())
        assert report["finetuned"] is True and "forvalue_recall_at_m" in report, name
    seeds = [json.loads((out / f"facts-s{s}.json").read_text())["recipe"]["seed"] for s in range(3)]
    assert seeds == [0, 1, 2]
