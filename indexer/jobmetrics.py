"""Metrics of the offline jobs (`index build`, `add`, `sync`) for a scheduler: a Prometheus text file.

`--metrics-file PATH` writes, after every run, one file in the text exposition format that node-exporter's
textfile collector reads (point it at a directory of `*.prom` files; one file per job and index):

    forvalue_index_job_success{job="sync",index="/srv/idx"} 1          1 = the last run succeeded, 0 = it failed
    forvalue_index_job_seconds{...} 12.4                               wall time of the last run
    forvalue_index_job_rows{...,kind="encoded"} 42                     rows of the last run, by kind
    forvalue_index_job_failures_total{...} 3                           failed runs this file has counted
    forvalue_index_job_last_run_timestamp_seconds{...} 1.7e9           unix time the last run ended
    forvalue_index_job_last_success_timestamp_seconds{...} 1.7e9       unix time of the last success (0: never)
    forvalue_index_sync_refit_advised{...} 0                           sync: 1 when a refit is advised
    forvalue_index_sync_recall{...,direction="most"} 0.97              sync: the sketch recall measured

The failure count and the last success time are carried over from the file a previous run wrote. The file is
replaced atomically (files.write_atomic): a collector never reads half of it. Torch-free (the CLI imports it).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from .files import write_atomic

PREFIX = "forvalue_index_"
_HELP = {
    "job_success": ("gauge", "1 if the last run of the job succeeded, 0 if it failed."),
    "job_seconds": ("gauge", "Wall time of the last run, in seconds."),
    "job_rows": ("gauge", "Rows of the last run, by kind (total, reused, encoded, dropped, metadata_updated)."),
    "job_failures_total": ("counter", "Failed runs counted in this file."),
    "job_last_run_timestamp_seconds": ("gauge", "Unix time the last run ended."),
    "job_last_success_timestamp_seconds": ("gauge", "Unix time the last successful run ended (0: never)."),
    "sync_refit_advised": ("gauge", "1 when the last sync advised a refit of the sketch maps."),
    "sync_recall": ("gauge", "Sketch recall measured by the last sync, by direction."),
}


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _previous(path: Path, name: str) -> float | None:
    """The value of sample `name` (without labels) in the file a previous run wrote, or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.search(rf"^{re.escape(PREFIX + name)}\{{[^\n]*\}} (\S+)$", text, re.MULTILINE)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def render(job: str, index: str, ok: bool, seconds: float, rows: Mapping[str, int], failures: int,
           last_success: float, now: float, sync: Mapping | None = None) -> str:
    """The text of the metrics file (Prometheus text exposition format 0.0.4)."""
    base = {"job": job, "index": index}
    samples: list[tuple[str, dict, float]] = [
        ("job_success", base, 1.0 if ok else 0.0), ("job_seconds", base, round(seconds, 3)),
        *[("job_rows", {**base, "kind": k}, float(v)) for k, v in sorted(rows.items())],
        ("job_failures_total", base, float(failures)), ("job_last_run_timestamp_seconds", base, round(now, 3)),
        ("job_last_success_timestamp_seconds", base, round(last_success, 3)),
    ]
    if sync is not None:
        samples.append(("sync_refit_advised", base, 1.0 if sync.get("refit_advised") else 0.0))
        for d in ("most", "least"):
            if sync.get("recall") and d in sync["recall"]:
                samples.append(("sync_recall", {**base, "direction": d}, float(sync["recall"][d])))
    out, seen = [], set()
    for name, labels, value in samples:
        if name not in seen:
            kind, text = _HELP[name]
            out += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
            seen.add(name)
        out.append(f"{PREFIX}{name}{_labels(labels)} {float(value)!r}")
    return "\n".join(out) + "\n"


def write_job_metrics(path: str | os.PathLike, job: str, index: str, ok: bool, seconds: float,
                      rows: Mapping[str, int] | None = None, sync: Mapping | None = None) -> None:
    """Write (atomically) the metrics of a run that just ended; see the module doc.

    Args:
        job: "build", "add" or "sync". index: the index directory (a label).
        ok: whether the run succeeded. rows: its row counts by kind (empty on failure).
        sync: the sync's result (`SyncResult.as_dict()`): refit advice and recall.
    """
    p = Path(path)
    now = time.time()
    failures = int(_previous(p, "job_failures_total") or 0) + (0 if ok else 1)
    last_success = now if ok else (_previous(p, "job_last_success_timestamp_seconds") or 0.0)
    text = render(job, index, ok, seconds, rows or {}, failures, last_success, now, sync)
    write_atomic(p, lambda f: f.write(text.encode("utf-8")))
