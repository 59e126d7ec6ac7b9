"""The Influence servicer: validate → library call → protobuf, nothing else.

Library calls (forward pass, FAISS, exact re-ranking) block, so they run in the model's executor (one
thread), never on the event loop, through the `Batcher` (concurrent TopK requests share forward passes;
a bounded queue; expired or cancelled calls never reach the model). Validation and conversion live in
`convert`, the exception → status mapping in `status`.

The served version is one attribute, swapped atomically by `attach` (hot swap: `app.InfluenceServer`
watches the index's CURRENT); a batch reads it once, so a response never mixes versions.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import grpc

from forvalue.indexer.deletion import delete_samples
from forvalue.indexer.errors import (
    IndexCorruptError, IndexMismatchError, InvalidRequestError, ModelError, NotReadyError, ResourceExhaustedError,
)
from forvalue.indexer.filters import Where
from forvalue.indexer.index import Index
from forvalue.indexer.results import Scores

from . import convert
from .batching import Batcher, BatchStats
from .config import ServerConfig
from .metrics import Metrics
from .protocol import ADMIN_SERVICE_NAME, SERVICE_NAME, pb, pb_grpc
from .status import rpc


def score_all(index: Index, check, samples: list[tuple[str, str]], where: Where | None = None) -> Scores:
    """The exact value of every training row in scope (matching `where`, not deleted) to the group `samples`
    (`check`: called between blocks of rows; it stops the work once the call's deadline passed)."""
    return index.scores(samples, where, check=check)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the time.monotonic() clock (None: no deadline), never later than grpc's."""
    now = time.monotonic()  # read first, so that now + remaining <= the true deadline
    remaining = context.time_remaining()
    return None if remaining is None else now + remaining


class InfluenceServicer(pb_grpc.InfluenceServicer):
    """Answers TopK, ScoreAll and Info once `attach` gave it an index; UNAVAILABLE before that.

    Args:
        config: limits on requests.
        executor: where library calls run (one worker: the model is used by one call at a time).
        metrics: where calls, batches and the served version are counted; None = a fresh `Metrics`.
    """

    def __init__(self, config: ServerConfig, executor: Executor, metrics: Metrics | None = None):
        self._config = config
        self._served: Index | None = None  # replaced whole by attach, never modified: the atomic swap
        self._load_error: BaseException | None = None
        self.batcher = Batcher(config, executor, lambda: self._served)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(self.batcher)
        self.on_published: Callable[[], Awaitable[Any]] | None = None  # set by the server: reload the index

    @property
    def version(self) -> str | None:
        """The index version being served, None before one is attached."""
        return None if self._served is None else self._served.version.name

    @property
    def stats(self) -> BatchStats:
        """The batcher's counters (forward passes, batch sizes, dropped calls)."""
        return self.batcher.stats

    @property
    def index(self) -> Index | None:
        """The index version being served, None before one is attached."""
        return self._served

    def attach(self, index: Index) -> None:
        """Serve `index` from the next batch on; batches already running finish with the version they read."""
        self._served = index
        self.metrics.serving(index.version.name)

    async def close(self) -> None:
        """Stop batching; calls still waiting get UNAVAILABLE."""
        await self.batcher.close()

    def load_failed(self, exc: BaseException) -> None:
        self._load_error = exc

    def _ready(self) -> Index:
        if self._served is None:
            exc = self._load_error
            if isinstance(exc, (IndexMismatchError, IndexCorruptError, ModelError)):
                # permanent until an operator acts: FAILED_PRECONDITION, not a retryable UNAVAILABLE
                raise type(exc)(f"the server could not load its index: {exc}")
            if exc is not None:
                raise NotReadyError(f"the server could not load its index: {exc}")
            raise NotReadyError("the model and index are still loading; retry when health says SERVING")
        return self._served

    @rpc(pb.TopKRequest)
    async def TopK(self, request: pb.TopKRequest, context: grpc.aio.ServicerContext) -> pb.TopKResponse:
        index = self._ready()
        images = getattr(index, "accepts_images", False)  # a VLM index takes images
        query = convert.topk_query(request, self._config, accepts_images=images)
        convert.check_topk_cost(query, self._config, index.shape())
        version, answers = await self.batcher.top_k(query, deadline_of(context))
        response = convert.topk_response(answers, version, query.max_text_chars)
        size = response.ByteSize()
        if size > self._config.max_message_bytes:  # grpc would fail to send it; say so, and count it so
            raise ResourceExhaustedError(f"the reply is {size / 2**20:.0f} MiB, above the message limit of "
                                         f"{self._config.max_message_bytes / 2**20:.0f} MiB (max_message_bytes); "
                                         "ask for fewer hits (k), cut the texts (max_text_chars) or explain fewer "
                                         "pairs")
        return response

    @rpc(pb.ScoreAllRequest)
    async def ScoreAll(self, request: pb.ScoreAllRequest, context: grpc.aio.ServicerContext):
        index = self._ready()
        images = getattr(index, "accepts_images", False)  # a VLM index takes images
        query = convert.score_all_query(request, self._config, accepts_images=images)
        version, scores = await self.batcher.call(
            functools.partial(score_all, samples=query.samples, where=query.where), deadline_of(context))
        cosines = None if getattr(scores, "cosines", None) is None else scores.cosines.tolist()
        for chunk in convert.score_chunks(scores.ids, scores.values.tolist(), query.chunk_size, version, scores.rows,
                                          scores.cut_samples, cosines):
            yield chunk

    @rpc(pb.DeleteRequest)
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        """InfluenceAdmin.Delete (registered only with ServerConfig.admin): publish, then serve, a version
        without these samples. The index directory's takedown lock serialises concurrent deletions."""
        if not request.ids:
            raise InvalidRequestError("ids", "give at least one training sample id")
        for i, sample_id in enumerate(request.ids):
            if not sample_id.strip():
                raise InvalidRequestError(f"ids[{i}]", "must not be empty")
        result = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(delete_samples, self._config.index_dir, list(request.ids),
                                    missing="ignore" if request.ignore_missing else "error"))
        if result.published and self.on_published is not None:
            await self.on_published()  # serve it now (the watcher would within watch_seconds)
        return convert.delete_response(result)

    @rpc(pb.InfoRequest)
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        index = self._ready()
        return convert.info_response(index.manifest, index.version.name)


def add_influence_handlers(servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer`'s TopK, ScoreAll and Info (an InfluenceServicer, or the shard router's) as
    forvalue.v1.Influence with raw-bytes requests (parsed by `status.rpc`, so garbage is INVALID_ARGUMENT)."""
    handlers = {
        "TopK": grpc.unary_unary_rpc_method_handler(
            servicer.TopK, response_serializer=pb.TopKResponse.SerializeToString),
        "ScoreAll": grpc.unary_stream_rpc_method_handler(
            servicer.ScoreAll, response_serializer=pb.ScoreAllChunk.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, response_serializer=pb.InfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def add_to_server(servicer: InfluenceServicer, server: grpc.aio.Server) -> None:
    """Register the servicer: Influence, and InfluenceAdmin when its config enables it."""
    add_influence_handlers(servicer, server)
    if servicer._config.admin:
        admin = {"Delete": grpc.unary_unary_rpc_method_handler(
            servicer.Delete, response_serializer=pb.DeleteResponse.SerializeToString)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, admin),))
        server.add_registered_method_handlers(ADMIN_SERVICE_NAME, admin)
