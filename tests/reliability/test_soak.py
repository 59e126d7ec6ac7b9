"""A soak: 2,000 sequential queries against an in-process server (tiny model) through the real client; no
errors, and the process's resident memory grows less than 5% between query 500 and query 2,000.

tools/soak.py does the same against the default model (10,000 queries by default).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from forvalue.client.client import InfluenceClient

from harness import QUERIES, K, RERANK, start

N, BASELINE = 2000, 500
MAX_GROWTH = 0.05


def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/status)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return psutil.Process(os.getpid()).memory_info().rss


@pytest.fixture
def one_torch_thread():
    """One intra-op thread while the soak runs: the tiny model gains nothing from more, and on a busy machine
    spinning OpenMP threads make 2,000 forward passes several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_2000_sequential_queries_without_errors_or_growth(served_index, local_index, one_torch_thread):
    srv = start(served_index[0], lambda: local_index, batch_wait_ms=0, watch_seconds=0.2)  # the watcher runs too
    rss, errors, answers = {}, [], {}
    t0 = time.monotonic()
    try:
        with InfluenceClient(srv.address, timeout=60) as client:
            for i in range(1, N + 1):
                q, direction = QUERIES[i % len(QUERIES)], ("most", "least")[i % 2]
                try:
                    result = client.search([q], k=K, direction=direction, rerank=RERANK)
                except Exception as exc:  # counted, not raised: the soak goes on, the count is the verdict
                    errors.append(f"{i}: {type(exc).__name__}: {exc}")
                    continue
                if i % 250 == 0:
                    answers[i] = (q, direction, result)
                if i in (BASELINE, N):
                    gc.collect()
                    rss[i] = rss_bytes()
    finally:
        srv.stop()
    seconds = time.monotonic() - t0
    growth = rss[N] / rss[BASELINE] - 1
    summary = (f"{N} queries in {seconds:.1f} s, {len(errors)} errors; RSS {rss[BASELINE] / 2**20:.1f} MB at query "
               f"{BASELINE}, {rss[N] / 2**20:.1f} MB at {N}: {growth * 100:+.2f}%")
    assert not errors, f"{summary}; first errors {errors[:3]}"
    assert growth < MAX_GROWTH, summary
    for q, direction, result in answers.values():  # still the right answers at the end
        local = local_index.search([q], k=K, direction=direction, rerank=RERANK)
        assert [h.id for h in result.hits] == [h.id for h in local.hits]
    print(summary)
