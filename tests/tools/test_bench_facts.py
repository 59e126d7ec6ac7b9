"""tools/bench_facts.py end to end at a toy size on the tiny test model: every step runs and the report has the
issue's keys (the numbers of a random 2-layer model mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from factories import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("forvalue", "forvalue_final", "bm25", "emb", "forvalue_pretrained")


def test_runs_every_step_and_reports_the_keys(tmp_path):
    model_dir = tmp_path / "tiny"
    make_model(seed=0, layers=2, tie=True).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "tools" / "bench_facts.py"), "--model", str(model_dir), "--people", "3",
            "--fields", "2", "--templates", "2", "--epochs", "2", "--batch", "4", "--top-layers", "1",
            "--tailpatch-questions", "2", "--threads", "1", "--out", str(out), "--json"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["finetuned"] is True and 0.0 <= report["answer_accuracy"] <= 1.0
    assert report["index_checkpoint"] == "intermediate" and report["index_normalize"] == "unit"
    for m in METHODS:
        for key in ("mrr", "recall_at_10", "recall_at_m", "tailpatch_top1", "tailpatch_top10"):
            assert isinstance(report[f"{m}_{key}"], float), f"{m}_{key}"
    assert report["tailpatch_questions"] == 2 and report["tailpatch_pairs"] > 0
    # a rerun reads the checkpoints and the measured tail-patch pairs back instead of computing them again
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 pairs measured" in again.stderr and "epoch 1" not in again.stderr
    assert json.loads(again.stdout)["forvalue_tailpatch_top10"] == report["forvalue_tailpatch_top10"]
