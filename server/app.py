"""The influence server: `create_server` (bound, testable, port 0 allowed) and `serve` (the process).

The server starts listening before the model and index are loaded; grpc.health.v1 says NOT_SERVING (and
Influence calls get UNAVAILABLE) until they are, SERVING after. On SIGTERM or SIGINT `serve` turns health
to NOT_SERVING (and ends health Watch streams), lets in-flight calls finish for `grace_seconds` (new calls
get UNAVAILABLE), then exits.

Hot swap: every `watch_seconds` the server reads the index's CURRENT; when a rebuild moved it, the new
version is opened with the model already loaded (on its own thread, not the model's) and then served from
the next batch on. A version that fails to load is logged and the old one keeps serving (tried again
when CURRENT changes, or on `reload()`).

What it serves is told once loaded (index directory, version, rows, model, address) and at every swap (old →
new version): to `InfluenceServer.announce` if set (`forvalue serve` prints it), else to the log at INFO.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from forvalue.indexer.errors import ConfigError, ForValueError

from .config import ServerConfig
from .metrics import Metrics, MetricsHTTPServer
from .protocol import SERVICE_NAME
from .security import TokenAuthInterceptor, server_credentials
from .servicer import InfluenceServicer, add_to_server

log = logging.getLogger("forvalue.server")

__all__ = ["ServerConfig", "InfluenceServer", "create_server", "serve"]


def describe(index) -> str:
    """`index`'s version, rows and model in a few words (what the server says it serves)."""
    manifest = getattr(index, "manifest", None) or {}
    model = manifest.get("model", {}).get("name") or getattr(getattr(index, "lm", None), "name", "?")
    return f"version {index.version.name} ({getattr(index, 'n', '?')} rows, model {model})"


def open_index(config: ServerConfig, lm=None, version: str | None = None):
    """Open a version of the index (the default loader; blocking).

    Args:
        lm: the loaded model (LoadedModel); None = load config.model_path (done once, at start: a hot swap
            passes the model of the version being served).
        version: the version name; None = CURRENT.
    """
    from forvalue.indexer.index import Index
    from forvalue.indexer.model import load_model

    if lm is None:
        lm = load_model(config.model_path, device=config.device, dtype=config.dtype)
    return Index.open(config.index_dir, lm, version=version)


class _Written:
    """A health Watch call's context that knows whether the last status it wrote was other than SERVING."""

    def __init__(self, context):
        self._context = context
        self.not_serving = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(reply)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            self.not_serving.clear()
        else:
            self.not_serving.set()


class HealthServicer(health.aio.HealthServicer):
    """grpc's health service, whose Watch streams end (OK) once the server drains and they sent NOT_SERVING.

    An open Watch (grpc's client-side health checking keeps one per connection) is a call in flight like any
    other: left open, it would hold every drain for the whole grace period.
    """

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._draining.set()

    async def _drained(self, written: _Written) -> None:
        await self._draining.wait()
        await written.not_serving.wait()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        written = _Written(context)
        watching = asyncio.ensure_future(super().Watch(request, written))
        drained = asyncio.ensure_future(self._drained(written))
        try:
            await asyncio.wait({watching, drained}, return_when=asyncio.FIRST_COMPLETED)
            if watching.done():
                watching.result()  # what the watch raised, if anything
        finally:
            watching.cancel()
            drained.cancel()


class InfluenceServer:
    """A bound grpc.aio server with its Influence, health and (optional) reflection services.

    `start()` starts listening and loads the model and index in the background; `wait_until_ready()`
    waits for that (raising what the load raised); `stop(grace)` drains and stops. Once loaded, CURRENT is
    watched every `config.watch_seconds` (hot swap); `reload()` checks it now. With `config.metrics_port`,
    `start()` also serves Prometheus metrics over HTTP on `config.metrics_host`, port `metrics_port`
    (`metrics.MetricsHTTPServer`: the gRPC token if set, bounded connections, idle timeout).
    """

    def __init__(self, server: grpc.aio.Server, port: int, config: ServerConfig, servicer: InfluenceServicer,
                 health_servicer: health.aio.HealthServicer, executor: ThreadPoolExecutor, load: Callable):
        self.server = server
        self.port = port
        self.metrics_host = config.metrics_host
        self.metrics_port: int | None = None  # the bound port of the metrics endpoint once started
        self.address = f"port {port}"  # host:port once create_server knows the host
        self.announce: Callable[[str], None] | None = None  # where start and swap lines go (None: the log)
        self._metrics_http: MetricsHTTPServer | None = None
        self.config = config
        self.servicer = servicer
        servicer.on_published = self.reload  # an admin Delete serves its new version before it answers
        self.health = health_servicer
        self._executor = executor
        self._load = load
        self._loading: asyncio.Future | None = None
        # opening a new version reads files and builds FAISS: its own thread, so queries go on meanwhile
        self._reload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forvalue-reload")
        self._reload_lock: asyncio.Lock | None = None
        self._seen: str | None = None  # what CURRENT named at the last check
        self._current_error: str | None = None  # why CURRENT could not be read at the last check
        self._watching: asyncio.Task | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port is not None:
            self._start_metrics()
        await self.server.start()
        self._loading = asyncio.ensure_future(self._load_index())

    def _start_metrics(self) -> None:
        c = self.config
        try:
            self._metrics_http = MetricsHTTPServer(c.metrics_host, c.metrics_port, self.servicer.metrics.registry,
                                                   token=c.token, max_connections=c.metrics_max_connections,
                                                   idle_seconds=c.metrics_idle_seconds)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {exc}; "
                              "choose another --metrics-port or --metrics-host") from exc
        self._metrics_http.start()
        self.metrics_port = self._metrics_http.server_port

    async def _load_index(self) -> None:
        try:
            index = await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        except Exception as exc:  # reported by wait_until_ready, and to callers as UNAVAILABLE
            self.servicer.load_failed(exc)
            raise
        self.servicer.attach(index)
        self._seen = index.version.name
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._tell(f"serving {self.config.index_dir} {describe(index)} on {self.address}")
        if self.config.watch_seconds > 0:
            self._watching = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.watch_seconds)
            try:
                await self._check(retry=False)
            except Exception:  # the watcher must outlive any one check
                log.exception("checking %s for a new index version failed", self.config.index_dir)

    def _open_version(self, name: str):
        """Open version `name` with the model of the version being served (blocking; the reload thread)."""
        return open_index(self.config, self.servicer.index.lm, name)

    async def reload(self) -> str | None:
        """Check CURRENT now and serve the version it names, if another (also one that failed before).

        Returns:
            the version served afterwards (None while the first load is still running). A version that
            cannot be opened (corrupt, incomplete, another model) is logged, and the old one keeps serving.
        """
        return await self._check(retry=True)

    async def _check(self, retry: bool) -> str | None:
        from forvalue.indexer.store import IndexRoot

        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            served = self.servicer.version
            if served is None:
                return None
            loop = asyncio.get_running_loop()
            try:
                name = await loop.run_in_executor(self._reload_executor, IndexRoot(self.config.index_dir).current)
            except Exception as exc:  # a broken CURRENT: keep serving what we have, say so once
                if retry or str(exc) != self._current_error:
                    log.error("cannot read CURRENT of %s, still serving %s: %s", self.config.index_dir, served, exc)
                self._current_error = str(exc)
                return served
            self._current_error = None
            changed, self._seen = name != self._seen, name
            if name is None or name == served or not (changed or retry):
                return served
            try:
                index = await loop.run_in_executor(self._reload_executor, self._open_version, name)
            except Exception as exc:
                log.error("index version %s could not be loaded, still serving %s (tried again when CURRENT "
                          "changes): %s: %s", name, served, type(exc).__name__, exc,
                          exc_info=not isinstance(exc, ForValueError))
                return served
            self.servicer.attach(index)  # in-flight batches finish with the version they started with
            self._tell(f"index swap: {served} → {name}: now serving {self.config.index_dir} {describe(index)}")
            return name

    def _tell(self, message: str) -> None:
        if self.announce is not None:
            self.announce(message)
        else:
            log.info("%s", message)

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Wait until the model and index are loaded and health says SERVING.

        Raises:
            what loading raised (e.g. IndexMismatchError); asyncio.TimeoutError after `timeout` seconds.
        """
        if self._loading is None:
            raise RuntimeError("start() the server first")
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, then stop: in-flight calls get `grace` seconds (None = cancel them now)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._watching is not None:
            self._watching.cancel()
        await self.servicer.close()
        if self._loading is not None:
            if not self._loading.done():
                self._loading.cancel()
            elif not self._loading.cancelled():
                self._loading.exception()  # a load failure was reported to callers already
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._reload_executor.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http is not None:
            httpd, self._metrics_http = self._metrics_http, None
            await asyncio.to_thread(httpd.stop)  # waits for serve_forever's poll (up to 0.5 s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def build_grpc_server(config, address: str, register: Callable[[grpc.aio.Server], None]
                      ) -> tuple[grpc.aio.Server, HealthServicer, int]:
    """A grpc.aio server with message limits, bearer-token auth and TLS from `config`, the services `register`
    adds, health and (with config.reflection) reflection, bound to `address` → (server, health, bound port).

    Shared by the influence server and the shard router (their configs have the same fields for this).

    Raises:
        ConfigError: the address cannot be bound; a TLS certificate or key file is unreadable or invalid.
    """
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0),
               ("grpc.server.max_pending_requests", 100_000),
               ("grpc.server.max_pending_requests_hard_limit", 100_000)]
    credentials = server_credentials(config)  # first: a bad TLS file fails before anything is built
    interceptors = [TokenAuthInterceptor(config.token)] if config.token is not None else []
    # no maximum_concurrent_rpcs: it would refuse health checks too under load; the batcher's queue bound
    # (config.max_queue) refuses model work only, RESOURCE_EXHAUSTED. grpc's own limits on calls waiting for the
    # server to take them (about 1,000) are raised: past them grpc cancels calls before any handler sees them
    # (CANCELLED, no request id, no metric), which a client reads as its own doing and never retries
    server = grpc.aio.server(options=options, interceptors=interceptors)
    register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address}")
    return server, health_servicer, port


def create_server(config: ServerConfig, address: str = "127.0.0.1:0", load: Callable | None = None
                  ) -> tuple[InfluenceServer, int]:
    """Build and bind (but do not start) the server; call it with the event loop that will run it.

    Args:
        config: what to serve and the limits on requests.
        address: host:port to listen on; port 0 picks a free port.
        load: a blocking callable returning the `Index` to serve; default: `open_index(config)`.

    Returns:
        (server, the bound port).

    Raises:
        ConfigError: the address cannot be bound; a TLS certificate or key file is unreadable or invalid.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forvalue-model")
    servicer = InfluenceServicer(config, executor, Metrics())
    server, health_servicer, port = build_grpc_server(config, address, lambda s: add_to_server(servicer, s))
    influence = InfluenceServer(server, port, config, servicer, health_servicer, executor,
                                load or (lambda: open_index(config)))
    influence.address = f"{address.rsplit(':', 1)[0]}:{port}"
    return influence, port


def serve(config: ServerConfig, address: str, announce: Callable[[str], None] = print) -> None:
    """Run the server until SIGTERM or SIGINT, then drain for `config.grace_seconds` and return.

    Raises:
        what loading the model or index raised (the server stops first).
    """
    asyncio.run(_serve(config, address, announce))


async def start_until_signal(server) -> asyncio.Event:
    """Start `server`; the returned event is set by SIGTERM or SIGINT (the server's own and the router's loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    return stop


async def drain(server, grace_seconds: float, announce: Callable[[str], None]) -> None:
    """Health NOT_SERVING, in-flight calls get `grace_seconds`, then stopped; announced before and after."""
    announce("stopping: health NOT_SERVING, draining in-flight calls")
    await server.stop(grace_seconds)
    announce("stopped")


async def _serve(config: ServerConfig, address: str, announce: Callable[[str], None]) -> None:
    server, port = create_server(config, address)
    server.announce = announce
    stop = await start_until_signal(server)
    host = address.rsplit(":", 1)[0]
    announce(f"listening on {host}:{port}; loading the model and index")
    if server.metrics_port is not None:
        shown = f"[{config.metrics_host}]" if ":" in config.metrics_host else config.metrics_host
        announce(f"metrics on http://{shown}:{server.metrics_port}/metrics")
    ready = asyncio.ensure_future(server.wait_until_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        raise ready.exception()
    if ready.done():  # the start line ("serving ... on host:port") was announced by the server itself
        await stopping
    ready.cancel()
    await drain(server, config.grace_seconds, announce)
