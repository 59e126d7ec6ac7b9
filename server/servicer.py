"""The Influence servicer: validate → library call → protobuf, nothing else.

Library calls (forward pass, FAISS, exact re-ranking) block, so they run in the model's executor (one
thread), never on the event loop. Validation and conversion live in `convert`, the exception → status
mapping in `status`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import grpc

from forvalue.indexer.index import Index, SearchResult

from . import convert
from .config import ServerConfig
from .convert import GROUP, TopKQuery
from .protocol import SERVICE_NAME, pb, pb_grpc
from .status import NotReadyError, rpc


class Served:
    """The loaded index version being served, and what is derived from it once (the ids of all rows)."""

    def __init__(self, index: Index):
        self.index = index
        self.version = index.version.name
        self._ids: list[str] | None = None

    def ids(self) -> list[str]:
        """Training sample ids in row order (read once, in the model's thread)."""
        if self._ids is None:
            self._ids = [str(row["id"]) for row in self.index.version.rows(list(range(self.index.n)))]
        return self._ids


def top_k(index: Index, query: TopKQuery) -> list[tuple[int, SearchResult]]:
    """The answers to a TopK query: one forward pass for all its samples, then one search per answer."""
    features = index.encode(query.samples)
    if query.group:
        return [(GROUP, index.search([], query.k, d, query.rerank, features=features)) for d in query.directions]
    return [(i, index.search([], query.k, d, query.rerank, features=features.select([i])))
            for i in range(features.n) for d in query.directions]


def score_all(served: Served, samples: list[tuple[str, str]]) -> tuple[list[str], list[float]]:
    """(ids, exact For-Value of every training row to the group `samples`, the mean over its members)."""
    scores = served.index.score_all(served.index.encode(samples)).mean(0)
    return served.ids(), scores.tolist()


class InfluenceServicer(pb_grpc.InfluenceServicer):
    """Answers TopK, ScoreAll and Info once `attach` gave it an index; UNAVAILABLE before that.

    Args:
        config: limits on requests.
        executor: where library calls run (one worker: the model is used by one call at a time).
    """

    def __init__(self, config: ServerConfig, executor: Executor):
        self._config = config
        self._executor = executor
        self._served: Served | None = None
        self._load_error: BaseException | None = None

    @property
    def version(self) -> str | None:
        """The index version being served, None before one is attached."""
        return None if self._served is None else self._served.version

    def attach(self, index: Index) -> None:
        self._served = Served(index)

    def load_failed(self, exc: BaseException) -> None:
        self._load_error = exc

    def _ready(self) -> Served:
        if self._served is None:
            if self._load_error is not None:
                raise NotReadyError(f"the server could not load its index: {self._load_error}")
            raise NotReadyError("the model and index are still loading; retry when health says SERVING")
        return self._served

    async def _call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @rpc(pb.TopKRequest)
    async def TopK(self, request: pb.TopKRequest, context: grpc.aio.ServicerContext) -> pb.TopKResponse:
        served = self._ready()
        query = convert.topk_query(request, self._config)
        answers = await self._call(top_k, served.index, query)
        return convert.topk_response(answers, served.version, query.max_text_chars)

    @rpc(pb.ScoreAllRequest)
    async def ScoreAll(self, request: pb.ScoreAllRequest, context: grpc.aio.ServicerContext):
        served = self._ready()
        query = convert.score_all_query(request, self._config)
        ids, scores = await self._call(score_all, served, query.samples)
        for chunk in convert.score_chunks(ids, scores, query.chunk_size, served.version):
            yield chunk

    @rpc(pb.InfoRequest)
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        served = self._ready()
        return convert.info_response(served.index.manifest, served.version)


def add_to_server(servicer: InfluenceServicer, server: grpc.aio.Server) -> None:
    """Register the servicer with raw-bytes requests (parsed by `status.rpc`, so garbage is INVALID_ARGUMENT)."""
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
