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
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
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
    """Collector of forvalue_dropped_total, read from the batcher's own counters at scrape time."""

    def __init__(self, batcher: Batcher):
        self._batcher = batcher

    def collect(self):
        stats = self._batcher.stats.snapshot()
        family = CounterMetricFamily("forvalue_dropped", "Requests dropped before reaching the model.",
                                     labels=["reason"])
        family.add_metric(["expired"], stats["dropped_expired"])
        family.add_metric(["cancelled"], stats["dropped_cancelled"])
        yield family


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
