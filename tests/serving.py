"""Test helpers for the influence service: a tiny served corpus and a server on its own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np

from forvalue.indexer.data import Sample

WORDS = "red green blue cat dog sun moon tree rock fish bird star sky sea hill".split()
OPS = ("Reverse", "Upper", "Repeat")


def default_meta(i: int, words: list[str]) -> dict:
    return {"source": ["a", "b"][i % 2], "n_words": len(words)}


def corpus(n: int, seed: int = 0, prefix: str = "s", max_words: int = 4, meta=default_meta) -> list[Sample]:
    """n seeded sentence-transformation samples (Reverse, Upper, Repeat of 2..max_words words) with the
    operation as label and `meta(i, words)` as metadata (default: a source a/b and the word count)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = list(rng.choice(WORDS, size=int(rng.integers(2, max_words + 1))))
        op = OPS[i % 3]
        resp = {"Reverse": " ".join(w[::-1]), "Upper": " ".join(w).upper(),
                "Repeat": " ".join(x + " " + x for x in w)}[op]
        out.append(Sample(id=f"{prefix}{i}", prompt=f"{op}: {' '.join(w)} ->", response=" " + resp, label=op,
                          meta=meta(i, w)))
    return out


class ServerThread:
    """A `create_server` server running on its own event loop in a daemon thread (tests stay synchronous).

    Args:
        config: the ServerConfig.
        load: the blocking index loader (None = the server's default, from config).
    """

    def __init__(self, config, load=None):
        from forvalue.server.app import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

        async def start():
            server, port = create_server(config, "127.0.0.1:0", load=load)
            await server.start()
            return server, port

        self.server, self.port = self.run(start())
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        self.run(self.server.wait_until_ready(timeout), timeout + 5)

    def stop(self, grace: float | None = None) -> None:
        try:
            self.run(self.server.stop(grace), 30 if grace is None else grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


def wait_for(predicate, timeout=30.0, what="condition"):
    """Poll `predicate` until true; fail after `timeout` seconds (a bound, not a timing assumption)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def block_model(srv: ServerThread) -> threading.Event:
    """Occupy the model's single worker until the returned event is set.

    Returns only once the worker is inside the blocking task, so that the executor's queue then counts
    the calls under test and not this task.
    """
    gate, running = threading.Event(), threading.Event()

    def block():
        running.set()
        gate.wait(60)

    srv.server._executor.submit(block)
    assert running.wait(30), "the model worker never started the blocking task"
    return gate


def queued(srv: ServerThread, n: int):
    """A predicate for `wait_for`: at least n calls wait in the server's model queue."""
    return lambda: srv.server._executor._work_queue.qsize() >= n


def pb_samples(*pairs):
    """(prompt, response) pairs as the protocol's ValuationSample messages."""
    from forvalue.server.protocol import pb

    return [pb.ValuationSample(prompt=p, response=r) for p, r in pairs]


def server_config(served_index, **kw):
    """A ServerConfig of the session's served index (the `served_index` fixture) with `kw` changed."""
    from forvalue.server.config import ServerConfig

    return ServerConfig(index_dir=served_index[0], **kw)


def stderr_lines(stream, q) -> None:
    """Put every line of a subprocess's stream into queue `q`, then None (run it in a thread)."""
    for line in stream:
        q.put(line)
    q.put(None)


def expect_line(q, text: str, timeout: float = 120) -> str:
    """The next line from `stderr_lines`'s queue containing `text` (bounded wait)."""
    while True:
        line = q.get(timeout=timeout)
        assert line is not None, f"forvalue serve exited before printing {text!r}"
        if text in line:
            return line


@contextlib.contextmanager
def serve_process(args: list[str], env: dict[str, str] | None = None):
    """`forvalue serve ARGS` in a subprocess → (process, queue of its stderr lines, see `expect_line`).

    The process is killed if it is still running when the block ends.
    """
    proc = subprocess.Popen([sys.executable, "-m", "forvalue.client.cli", "serve", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=stderr_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
