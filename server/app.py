"""The influence server: `create_server` (bound, testable, port 0 allowed) and `serve` (the process).

The server starts listening before the model and index are loaded; grpc.health.v1 says NOT_SERVING (and
Influence calls get UNAVAILABLE) until they are, SERVING after. On SIGTERM or SIGINT `serve` turns health
to NOT_SERVING, lets in-flight calls finish for `grace_seconds` (new calls get UNAVAILABLE), then exits.
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

from forvalue.indexer.errors import ConfigError

from .config import ServerConfig
from .protocol import SERVICE_NAME
from .servicer import InfluenceServicer, add_to_server

log = logging.getLogger("forvalue.server")

__all__ = ["ServerConfig", "InfluenceServer", "create_server", "serve"]


def open_index(config: ServerConfig):
    """Load the model and open the index's CURRENT version (the default loader; blocking)."""
    from forvalue.indexer.index import Index
    from forvalue.indexer.model import load_model

    lm = load_model(config.model_path, device=config.device)
    return Index.open(config.index_dir, lm)


class InfluenceServer:
    """A bound grpc.aio server with its Influence, health and (optional) reflection services.

    `start()` starts listening and loads the model and index in the background; `wait_until_ready()`
    waits for that (raising what the load raised); `stop(grace)` drains and stops.
    """

    def __init__(self, server: grpc.aio.Server, port: int, config: ServerConfig, servicer: InfluenceServicer,
                 health_servicer: health.aio.HealthServicer, executor: ThreadPoolExecutor, load: Callable):
        self.server = server
        self.port = port
        self.config = config
        self.servicer = servicer
        self.health = health_servicer
        self._executor = executor
        self._load = load
        self._loading: asyncio.Future | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._loading = asyncio.ensure_future(self._load_index())

    async def _load_index(self) -> None:
        try:
            index = await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        except Exception as exc:  # reported by wait_until_ready, and to callers as UNAVAILABLE
            self.servicer.load_failed(exc)
            raise
        self.servicer.attach(index)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s) on port %d", self.config.index_dir, index.version.name, self.port)

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
        if self._loading is not None:
            if not self._loading.done():
                self._loading.cancel()
            elif not self._loading.cancelled():
                self._loading.exception()  # a load failure was reported to callers already
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


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
        ConfigError: the address cannot be bound.
    """
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_queue)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forvalue-model")
    servicer = InfluenceServicer(config, executor)
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise ConfigError(f"cannot listen on {address}")
    return InfluenceServer(server, port, config, servicer, health_servicer, executor,
                           load or (lambda: open_index(config))), port


def serve(config: ServerConfig, address: str, announce: Callable[[str], None] = print) -> None:
    """Run the server until SIGTERM or SIGINT, then drain for `config.grace_seconds` and return.

    Raises:
        what loading the model or index raised (the server stops first).
    """
    asyncio.run(_serve(config, address, announce))


async def _serve(config: ServerConfig, address: str, announce: Callable[[str], None]) -> None:
    server, port = create_server(config, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    host = address.rsplit(":", 1)[0]
    announce(f"listening on {host}:{port}; loading the model and index")
    ready = asyncio.ensure_future(server.wait_until_ready())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        raise ready.exception()
    if ready.done():
        announce(f"serving {config.index_dir} ({server.servicer.version}) on {host}:{port}")
        await stopping
    announce("stopping: health NOT_SERVING, draining in-flight calls")
    ready.cancel()
    await server.stop(config.grace_seconds)
    announce("stopped")
