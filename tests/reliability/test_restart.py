"""A server stopped and started again on the same index gives exactly the same answers (ids and scores): in
the same process, and as a new `forvalue serve` process (another hash seed, a fresh model load)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from forvalue.client.client import InfluenceClient
from forvalue.server.config import ServerConfig

from serving import ServerThread, corpus

QUERIES = [(s.prompt, s.response) for s in corpus(5, seed=19, prefix="q")]


def ask(address: str) -> list:
    """Every answer of a fixed list of TopK and ScoreAll calls, sent one after the other."""
    out = []
    with InfluenceClient(address, timeout=60) as client:
        for k, rerank in ((1, 1), (5, 12), (20, 40)):
            for group in (True, False):
                for q, res in client.top_k(QUERIES, k=k, direction="both", rerank=rerank, group=group):
                    out.append((q, res.version, res.direction, res.candidates,
                                [(h.id, h.row, h.rank, h.score, h.metadata) for h in res.hits]))
        for chunk_size in (0, 5):
            ids, scores = client.score_all(QUERIES, chunk_size=chunk_size)
            out.append((ids, scores.tolist()))
        out.append(client.info())
    return out


def test_same_answers_after_stop_and_start(served_index, served_model_dir):
    config = ServerConfig(index_dir=served_index[0], model_path=served_model_dir, k_cap=20, watch_seconds=0)
    answers = []
    for _ in range(2):
        srv = ServerThread(config)
        try:
            srv.wait_ready()
            answers.append(ask(srv.address))
        finally:
            srv.stop()
    before, after = answers
    assert len(before) == 3 * (2 + 2 * len(QUERIES)) + 2 + 1
    assert after == before  # exactly: ids, rows, ranks and float scores bit for bit
    print(f"answers compared: {len(before)}, failures: 0")


def serve_process(index_dir: str, model_dir: str, hash_seed: int) -> tuple[subprocess.Popen, str]:
    """`forvalue serve --port 0` in its own process; returns it once it says it is serving, and its address."""
    cmd = [sys.executable, "-c", "from forvalue.client.cli import main; main()", "serve", "--index", index_dir,
           "--model", model_dir, "--port", "0", "--k-cap", "20", "--watch-seconds", "0", "--grace", "0"]
    # one torch thread: on a shared 2-core machine a second one spins against the client for seconds
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    deadline, said = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        said.append(line)
        found = re.search(r"serving .* on (127\.0\.0\.1:[0-9]+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"forvalue serve did not start: {''.join(said)}")


def test_same_answers_from_a_new_server_process(served_index, served_model_dir):
    answers = []
    for hash_seed in (1, 2):
        proc, address = serve_process(served_index[0], served_model_dir, hash_seed)
        try:
            answers.append(ask(address))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc.stderr.close()
    before, after = answers
    assert len(before) == 3 * (2 + 2 * len(QUERIES)) + 2 + 1
    assert after == before
    print(f"answers compared across processes: {len(before)}, failures: 0")
