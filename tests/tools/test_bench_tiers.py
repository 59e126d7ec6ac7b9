"""tools/bench_tiers.py on the tiny model: one run builds the three storage tiers of the same rows and reports
each one's bytes, timings and answers against the float32 tier; the recompute tier's answers are float32's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving import corpus

ROOT = Path(__file__).resolve().parents[2]


def test_bench_tiers_reports_every_tier_and_recompute_equals_float32(tmp_path, served_model_dir):
    rows = [{"prompt": s.prompt, "response": s.response, "label": s.label or "a", "split": split}
            for split, n, seed in (("train", 24, 0), ("test", 3, 9)) for s in corpus(n, seed=seed)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_tiers.py"), "--model", served_model_dir,
                        "--data", str(data), "--queries", "3", "--latency-queries", "2", "--k", "3", "--rerank",
                        "8", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["train_rows"] == 24 and out["queries"] == 3 and set(out["tiers"]) == {"float32", "float16", "recompute"}
    t = out["tiers"]
    # the recompute tier stores no hidden states and answers exactly as the stored float32 tier
    assert t["recompute"]["rerank_bytes_per_sample"] < t["float16"]["rerank_bytes_per_sample"] \
        < t["float32"]["rerank_bytes_per_sample"]
    assert t["recompute"]["top_k_overlap_with_float32"] == 1.0
    assert t["recompute"]["max_relative_score_difference"] < 1e-4
    assert t["recompute"]["answers_compared"] == 2 * 2  # the timed queries, most and least
    assert t["float16"]["answers_compared"] == 3 * 2
    assert 0.5 <= t["float16"]["top_k_overlap_with_float32"] <= 1.0
    assert t["float16"]["max_relative_score_difference"] < 0.05
    for tier in t.values():
        assert tier["search_p50_ms"] > 0 and tier["build_seconds"] >= 0
