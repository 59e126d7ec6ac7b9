"""Prometheus metrics and the access log of the influence service.

`Metrics` owns its own `CollectorRegistry` (not prometheus_client's global one, so several servers in one
process do not clash):

| metric                                  | what                                                        |
|-----------------------------------------|-------------------------------------------------------------|
| forvalue_requests_total{method,code}    | Influence calls answered, by grpc status name (OK, ...)     |
| forvalue_request_seconds{method}        | histogram of call durations, parsing to status              |
| forvalue_batch_requests                 | histogram of TopK requests per forward pass                 |
| forvalue_queue_depth                    | requests waiting for or in the model (read at scrape)       |
| forvalue_index_info{version}            | 1 for the index version being served                        |
| forvalue_dropped_total{reason}          | requests dropped before the model: expired / cancelled      |

Every Influence call gets a request id (the client's `x-request-id` metadata, else a fresh uuid4 hex),
sent back as trailing metadata `x-request-id` and logged once per call as one JSON line on the
"forvalue.server.access" logger: {"request_id", "method", "code", "seconds", "n_samples", "index_version"}.
Calls refused by the token check (UNAUTHENTICATED) never reach the servicer and are not counted.

`MetricsHTTPServer` serves the registry at /metrics over HTTP/1.0 (one request per connection): bound to a
given host (`forvalue serve --metrics-host`, loopback by default), with the server's bearer token required
when it has one (401 otherwise), at most `max_connections` connections handled at once by a fixed pool of
threads (connections beyond that are closed at once, unanswered) and each closed when idle for
`idle_seconds` (a client that connects and sends nothing holds a worker only that long).
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

if TYPE_CHECKING:
    from .batching import Batcher

access_log = logging.getLogger("forvalue.server.access")

REQUEST_ID = "x-request-id"
MAX_REQUEST_ID_CHARS = 128  # a longer client id is replaced, so a client cannot flood the log
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The client's `x-request-id` metadata if present (and at most 128 characters), else a uuid4 hex."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS:
            return value
    return uuid.uuid4().hex


class _Dropped:
    """Collector of forvalue_dropped_total and forvalue_row_tokens_total, read from the batcher's own counters
    at scrape time."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher

    def collect(self):
        stats = self._batcher.stats.snapshot()
        family = CounterMetricFamily("forvalue_dropped", "Requests dropped before reaching the model.",
                                     labels=["reason"])
        family.add_metric(["expired"], stats["dropped_expired"])
        family.add_metric(["cancelled"], stats["dropped_cancelled"])
        yield family
        rows = CounterMetricFamily("forvalue_row_tokens", "Training rows' tokens whose next-token distributions "
                                   "exact scores needed: computed, or reused within a batch.", labels=["source"])
        rows.add_metric(["computed"], stats["row_tokens_computed"])
        rows.add_metric(["reused"], stats["row_tokens_reused"])
        yield rows


class Metrics:
    """The service's metrics in a registry of their own (`registry`, for `start_http_server`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("forvalue_requests", "Influence calls answered, by method and grpc status.",
                                ["method", "code"], registry=self.registry)
        self.request_seconds = Histogram("forvalue_request_seconds", "Duration of Influence calls.", ["method"],
                                         registry=self.registry)
        self.batch_requests = Histogram("forvalue_batch_requests", "TopK requests sharing one forward pass.",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("forvalue_queue_depth", "Requests waiting for or in the model.",
                                 registry=self.registry)
        self.index_info = Gauge("forvalue_index_info", "1 for the index version being served.", ["version"],
                                registry=self.registry)
        self._version: str | None = None
        self._version_lock = threading.Lock()

    def watch(self, batcher: Batcher) -> None:
        """Report `batcher`'s queue depth, forward passes and dropped requests."""
        self.queue_depth.set_function(lambda: batcher.queued)
        batcher.on_pass = self.batch_requests.observe
        self.registry.register(_Dropped(batcher))

    def serving(self, version: str) -> None:
        """Mark `version` as the one served (index_info 1), removing the previous version's series."""
        with self._version_lock:
            if self._version is not None and self._version != version:
                self.index_info.remove(self._version)
            self._version = version
            self.index_info.labels(version).set(1)

    def begin(self, method: str, context: grpc.aio.ServicerContext) -> Call:
        """Start timing a call; its request id goes back as trailing metadata."""
        return Call(self, method, context)


class Call:
    """One Influence call being answered: its request id, start time and what the access log says of it."""

    __slots__ = ("metrics", "method", "request_id", "start", "n_samples", "done")

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext):
        self.metrics = metrics
        self.method = method
        self.start = time.perf_counter()
        self.request_id = request_id(context)
        self.n_samples = 0
        self.done = False
        context.set_trailing_metadata(self.trailing_metadata)

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID, self.request_id),)

    def finish(self, code: grpc.StatusCode, version: str | None) -> None:
        """Count the call and log its access line (once; before the status is sent, so a scrape sees it)."""
        if self.done:
            return
        self.done = True
        seconds = time.perf_counter() - self.start
        self.metrics.requests.labels(self.method, code.name).inc()
        self.metrics.request_seconds.labels(self.method).observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({"request_id": self.request_id, "method": self.method, "code": code.name,
                                        "seconds": round(seconds, 6), "n_samples": self.n_samples,
                                        "index_version": version}))


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """GET /metrics (or /): the registry in the Prometheus text format; 401 without the token when one is set."""

    server: MetricsHTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive holding a worker

    def setup(self) -> None:
        self.timeout = self.server.idle_seconds  # every read and write of this connection
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._reply(404, b"not found; the metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        if not self.server.authorized(self.headers.get("Authorization")):
            self._reply(401, b"missing or invalid bearer token; send the server's token (Authorization: Bearer)\n",
                        "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="forvalue metrics"'})
            return
        self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _reply(self, code: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's name)
        pass  # scrapes are not access-logged; refusals are counted (MetricsHTTPServer.refused)


class MetricsHTTPServer(http.server.HTTPServer):
    """The /metrics endpoint with bounded threads and connections, an idle timeout and an optional token.

    Args:
        host, port: where to listen (port 0 picks a free one: `server_port`).
        registry: what to serve.
        token: the bearer token a scrape must send (`Authorization: Bearer <token>`); None = none needed.
        max_connections: connections handled at once (= worker threads); more are closed at once.
        idle_seconds: a connection that sends or reads nothing for this long is closed.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, host: str, port: int, registry: CollectorRegistry, token: str | None = None,
                 max_connections: int = 8, idle_seconds: float = 10.0):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.idle_seconds = idle_seconds
        self.refused = 0  # connections closed unanswered because max_connections were busy
        self._expected = None if token is None else token.encode()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="forvalue-metrics")
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _MetricsHandler)

    def server_bind(self) -> None:
        # as HTTPServer's, without its reverse DNS lookup of the host (socket.getfqdn can hang without a resolver)
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the token (always, when no token is set); constant time."""
        if self._expected is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a client hanging up mid-reply: nothing to answer
            pass
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.shutdown_request(request)
            self._slots.release()

    def start(self) -> None:
        """Serve on a daemon thread until `stop()`."""
        self._thread = threading.Thread(target=self.serve_forever, name="forvalue-metrics-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the open connections (unblocking their workers) and the socket."""
        self.shutdown()  # waits for serve_forever's poll (up to 0.5 s)
        with self._open_lock:
            for request in list(self._open):
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.server_close()
        if self._thread is not None:
            self._thread.join()
