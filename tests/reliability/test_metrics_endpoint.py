"""The Prometheus endpoint is not open to all (issue 18.5): loopback unless `--metrics-host` says otherwise, the
server's bearer token required when it has one, a bounded number of connections (worker threads) and idle
connections closed. It used to bind the gRPC host (0.0.0.0), take no token and start a thread per connection
with no timeout (3,000 idle connections = 3,000 threads)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from forvalue.server.app import create_server
from forvalue.server.config import ServerConfig

from serving import ServerThread, wait_for

TOKEN = "metrics-token-1"


def get(port: int, token: str | None = None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def metered(served_index, local_index):
    """A server with a token and its metrics endpoint: 4 connections at most, idle ones closed after 0.5 s."""
    srv = ServerThread(ServerConfig(index_dir=served_index[0], watch_seconds=0, token=TOKEN, metrics_port=0,
                                    metrics_max_connections=4, metrics_idle_seconds=0.5),
                       load=lambda: local_index)
    try:
        srv.wait_ready(30)
        yield srv
    finally:
        srv.stop()


def test_loopback_by_default_even_when_grpc_listens_everywhere(served_index, local_index):
    async def bound_host() -> str:
        server, _ = create_server(ServerConfig(index_dir=served_index[0], watch_seconds=0, metrics_port=0),
                                  "0.0.0.0:0", load=lambda: local_index)
        await server.start()
        try:
            return server._metrics_http.server_address[0]
        finally:
            await server.stop(0)

    assert asyncio.run(bound_host()) == "127.0.0.1"


def test_token_required(metered):
    port = metered.server.metrics_port
    assert get(port)[0] == 401
    assert get(port, "wrong-token")[0] == 401
    status, body = get(port, TOKEN)
    assert status == 200 and "forvalue_queue_depth" in body
    assert "forvalue_" not in get(port)[1]  # a refusal shows no metric


def test_idle_connections_do_not_add_threads_and_are_closed(metered):
    port = metered.server.metrics_port
    assert get(port, TOKEN)[0] == 200  # workers exist lazily: start from a used endpoint
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    try:
        time.sleep(0.3)  # every connection accepted, none sent a byte
        assert threading.active_count() <= before + 4, (before, threading.active_count())
        # each is closed by the server: the 36 over the bound at once, the others once idle 0.5 s
        started = time.monotonic()
        for s in idle:
            assert s.recv(1) == b"", "the server answered or kept an idle connection"
        assert time.monotonic() - started < 5
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: get(port, TOKEN)[0] == 200, timeout=10, what="a scrape after the idle connections")
