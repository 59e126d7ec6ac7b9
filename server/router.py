"""The shard router: one forvalue.v1.Influence endpoint in front of several shard servers.

Each shard is an ordinary `forvalue serve` over its own index (a disjoint part of the corpus). The router
loads no model: it forwards every call, with the caller's deadline (or `shard_timeout` when the caller
set none), to every shard at once, and merges:

- TopK: each shard answers its exact top-k of its own rows (exact For-Value of its first-stage
  candidates), so the top-k of the union of the shards' answers, by score, is the exact top-k of those
  candidates: ranks are renumbered, `candidates` and `exact_scored` summed, groups (`group_by`) merged
  by key (counts and totals summed, mean = total / count, hits merged the same way). A hit's `row` is
  its row in the shard that answered (ids are the corpus's own); a `percentile` stays the shard's own
  (its exact interval, percentile_low/high, is dropped: it says nothing about the whole corpus).
  Certified answers (TopKRequest.scores) merge by the midpoints of their intervals; each hit keeps its
  interval, but rank_certified and set_certified are dropped (a shard proves them among its own candidates).
  The candidates of a sharded index are a superset of one index's (every row of the global top-C by
  sketch score is in its shard's top-C), so with the same `rerank` a routed answer is at least as good.
- ScoreAll: the shards' streams one after the other, in shard order; `offset` and `rows` continue from
  one shard to the next (shard s's rows start after the rows of shards 0..s−1).
- Info: the shards' models must agree (else FAILED_PRECONDITION); n_samples is the sum; the manifest
  holds "router" {"shards": [per shard: address, ok, index_version, n_samples, index_kind or error]}.

Every response's `index_version` is the shards' versions joined by "+" in shard order; TopKResponse lists
`shards_answered` and `shards_failed` ("address: CODE: message").

A shard that fails (down, overloaded, its deadline passed, ...) fails the call with UNAVAILABLE naming
it, unless TopKRequest.allow_partial: then the answer is merged from the shards that answered (none:
UNAVAILABLE), and the shards get 90% of the caller's remaining time, so that a shard too slow for the
deadline is dropped while the others' answer still arrives in time. A shard answering INVALID_ARGUMENT
fails the call with INVALID_ARGUMENT (the request is bad everywhere); the caller's own deadline passing
is DEADLINE_EXCEEDED. ScoreAll needs every shard (a row list with a hole would be wrong). Info answers
from the shards that answer and lists the others (none: UNAVAILABLE).

Requests are forwarded as the bytes the caller sent, so fields the router does not read reach the
shards unchanged. The router's own `token` is checked on incoming calls and sent to the shards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2

from forvalue.indexer.errors import ConfigError, DeadlineExceededError, IndexMismatchError, ShardsUnavailableError

from .app import HealthServicer, build_grpc_server, drain, start_until_signal
from .metrics import REQUEST_ID, Metrics
from .protocol import SERVICE_NAME, pb
from .servicer import add_influence_handlers
from .status import rpc

log = logging.getLogger("forvalue.server.router")

__all__ = ["RouterConfig", "RouterServer", "create_router", "serve_router", "merge_answers"]

VERSION_SEP = "+"
PARTIAL_SHARE = 0.9  # of the caller's remaining time given to the shards when partial answers are allowed


@dataclass(frozen=True)
class RouterConfig:
    """How the router runs.

    Attributes:
        shards: host:port of every shard server, in shard order (the order of ScoreAll's rows).
        shard_timeout: seconds a shard call may take when the caller set no deadline.
        max_message_bytes: largest request or response message (both sides).
        token: bearer token required of callers (None: none) and sent to the shards.
        tls_cert, tls_key: the router's own TLS (PEM files), as in ServerConfig.
        shard_tls_ca: PEM root certificates of the shards' TLS; None: plaintext to the shards.
        reflection: serve gRPC server reflection.
        grace_seconds: on SIGTERM, how long in-flight calls may take to finish.
    """

    shards: tuple[str, ...]
    shard_timeout: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    shard_tls_ca: str | None = None
    reflection: bool = True
    grace_seconds: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.shards, str) or not self.shards:
            raise ConfigError("shards must list at least one host:port (--shards ADDR1,ADDR2,...)")
        for address in self.shards:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"shard address {address!r} is not host:port")
        if len(set(self.shards)) != len(self.shards):
            raise ConfigError(f"shards are listed twice: {list(self.shards)}")
        if not 0 < self.shard_timeout < float("inf"):
            raise ConfigError(f"shard_timeout must be > 0 seconds, got {self.shard_timeout}")
        if self.max_message_bytes < 1:
            raise ConfigError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together (--tls-cert, --tls-key); give both, or neither")


# --- merging (pure: messages in, messages out) ---------------------------------------------------------


def _best_first(hits: list[tuple[int, pb.Hit]], least: bool) -> list[tuple[int, pb.Hit]]:
    """(shard, hit) pairs best first: by score (ascending for LEAST), then shard order, then the shard's rank."""
    sign = 1.0 if least else -1.0
    return sorted(hits, key=lambda sh: (sign * sh[1].score, sh[0], sh[1].rank))


def _merged_hits(per_shard: list[tuple[int, list[pb.Hit]]], k: int, least: bool) -> list[pb.Hit]:
    ranked = _best_first([(s, h) for s, hits in per_shard for h in hits], least)[:k]
    out = []
    for rank, (_, h) in enumerate(ranked, start=1):
        hit = pb.Hit()
        hit.CopyFrom(h)
        hit.rank = rank
        hit.ClearField("percentile_low")  # exact within its shard only
        hit.ClearField("percentile_high")
        hit.ClearField("rank_certified")  # certified among its shard's candidates only
        out.append(hit)
    return out


def merge_answers(answers: list[tuple[int, pb.Answer]], k: int) -> pb.Answer:
    """One answer from the shards' answers (shard index, answer) to the same query and direction.

    Each shard's hits are its exact top-k, so the k best of their union are the exact top-k of the union:
    scores descending (ascending for LEAST), ties broken by shard order and then the shard's own rank.
    Groups with the same (key, missing) are merged: count and total summed, mean = total / count, hits
    as above; ordered by total, largest first (smallest first for LEAST).
    """
    first = answers[0][1]
    least = first.direction == pb.LEAST
    out = pb.Answer(query_index=first.query_index, direction=first.direction,
                    candidates=sum(a.candidates for _, a in answers),
                    exact_scored=sum(a.exact_scored for _, a in answers))
    out.hits.extend(_merged_hits([(s, list(a.hits)) for s, a in answers], k, least))
    groups: dict[tuple[str, bool], list[tuple[int, pb.Group]]] = {}
    for s, a in answers:
        for g in a.groups:
            groups.setdefault((g.key, g.missing), []).append((s, g))
    merged = []
    for (key, missing), parts in groups.items():
        count = sum(g.count for _, g in parts)
        total = sum(g.total for _, g in parts)
        group = pb.Group(key=key, missing=missing, count=count, total=total, mean=total / count if count else 0.0)
        group.hits.extend(_merged_hits([(s, list(g.hits)) for s, g in parts], k, least))
        merged.append(group)
    merged.sort(key=lambda g: (g.total if least else -g.total, g.missing, g.key))
    out.groups.extend(merged)
    return out


def merge_topk(responses: list[tuple[int, pb.TopKResponse]], k: int) -> pb.TopKResponse:
    """The merged response of the shards that answered (shard index, response), in shard order.

    Raises:
        RuntimeError: the shards' responses do not line up (another number or order of answers).
    """
    n_answers = {len(r.answers) for _, r in responses}
    if len(n_answers) != 1:
        raise RuntimeError(f"the shards gave different numbers of answers {sorted(n_answers)} to one request")
    out = pb.TopKResponse(index_version=VERSION_SEP.join(r.index_version for _, r in responses))
    for i in range(n_answers.pop()):
        parts = [(s, r.answers[i]) for s, r in responses]
        if len({(a.query_index, a.direction) for _, a in parts}) != 1:
            raise RuntimeError(f"the shards' answers {i} are to different queries or directions")
        out.answers.append(merge_answers(parts, k))
    return out


# --- the servicer --------------------------------------------------------------------------------------


def _describe(address: str, exc: grpc.RpcError) -> str:
    return f"{address}: {exc.code().name}: {exc.details() or ''}".rstrip(": ")


class RouterServicer:
    """Forwards Influence calls to the shards and merges their answers (see the module docstring)."""

    def __init__(self, config: RouterConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.version: str | None = None  # the shards' versions at the last merged answer
        self._channels: list[grpc.aio.Channel] = []
        self._topk: list[Callable] = []
        self._score_all: list[Callable] = []
        self._info: list[Callable] = []

    def connect(self) -> None:
        """Open a channel to every shard (on the event loop that will use them)."""
        options = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.max_send_message_length", self.config.max_message_bytes)]
        creds = None
        if self.config.shard_tls_ca is not None:
            try:
                with open(self.config.shard_tls_ca, "rb") as f:
                    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            except OSError as exc:
                raise ConfigError(f"shard_tls_ca {self.config.shard_tls_ca}: cannot read it ({exc.strerror})") from exc
        for address in self.config.shards:
            channel = (grpc.aio.insecure_channel(address, options=options) if creds is None
                       else grpc.aio.secure_channel(address, creds, options=options))
            self._channels.append(channel)
            # requests go on as the caller's bytes (request_serializer None: bytes pass through)
            self._topk.append(channel.unary_unary(f"/{SERVICE_NAME}/TopK",
                                                  response_deserializer=pb.TopKResponse.FromString))
            self._score_all.append(channel.unary_stream(f"/{SERVICE_NAME}/ScoreAll",
                                                        response_deserializer=pb.ScoreAllChunk.FromString))
            self._info.append(channel.unary_unary(f"/{SERVICE_NAME}/Info",
                                                  response_deserializer=pb.InfoResponse.FromString))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    def _call_options(self, context: grpc.aio.ServicerContext, share: float = 1.0) -> dict:
        """timeout: `share` of the caller's remaining time (else shard_timeout); metadata: token, request id."""
        remaining = context.time_remaining()
        metadata = [(key, value) for key, value in context.invocation_metadata() or () if key == REQUEST_ID]
        if self.config.token is not None:
            metadata.append(("authorization", f"Bearer {self.config.token}"))
        return {"timeout": self.config.shard_timeout if remaining is None else max(share * remaining, 0.0),
                "metadata": tuple(metadata)}

    async def _fan_out(self, calls: list[Callable], raw: bytes, context, share: float = 1.0) -> list:
        options = self._call_options(context, share)
        return await asyncio.gather(*(call(raw, **options) for call in calls), return_exceptions=True)

    def _failures(self, results: list, context, caller_deadline: float | None) -> list[str]:
        """What each failed shard said; raises at once for a bad request or the caller's deadline passing."""
        failed = []
        for address, result in zip(self.config.shards, results):
            if isinstance(result, grpc.RpcError):
                if result.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ConfigError(f"shard {address}: {result.details()}")
                if (result.code() == grpc.StatusCode.DEADLINE_EXCEEDED and caller_deadline is not None
                        and time.monotonic() >= caller_deadline):
                    raise DeadlineExceededError(f"the call's deadline passed before every shard answered "
                                                f"({_describe(address, result)})")
                failed.append(_describe(address, result))
            elif isinstance(result, BaseException):
                raise result
        return failed

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @rpc(pb.TopKRequest)
    async def TopK(self, request: pb.TopKRequest, context: grpc.aio.ServicerContext) -> pb.TopKResponse:
        deadline = self._deadline(context)
        # a partial answer must still arrive in time: then a slow shard gets PARTIAL_SHARE of the time left
        share = PARTIAL_SHARE if request.allow_partial else 1.0
        results = await self._fan_out(self._topk, request.SerializeToString(), context, share)
        failed = self._failures(results, context, deadline)
        answered = [(s, r) for s, r in enumerate(results) if isinstance(r, pb.TopKResponse)]
        if failed and (not request.allow_partial or not answered):
            hint = "; set allow_partial for an answer from the others" if answered else ""
            raise ShardsUnavailableError(f"{len(failed)} of {len(results)} shards did not answer "
                                         f"({'; '.join(failed)}){hint}")
        response = merge_topk(answered, request.k)
        response.shards_answered.extend(self.config.shards[s] for s, _ in answered)
        response.shards_failed.extend(failed)
        self.version = response.index_version
        return response

    @rpc(pb.ScoreAllRequest)
    async def ScoreAll(self, request: pb.ScoreAllRequest, context: grpc.aio.ServicerContext):
        deadline = self._deadline(context)
        infos = await self._fan_out(self._info, pb.InfoRequest().SerializeToString(), context)
        failed = self._failures(infos, context, deadline)
        if failed:
            raise ShardsUnavailableError(f"ScoreAll needs every shard; {'; '.join(failed)}")
        version = VERSION_SEP.join(i.index_version for i in infos)
        options = self._call_options(context)
        raw = request.SerializeToString()
        streams = [call(raw, **options) for call in self._score_all]  # every shard starts scoring now
        entries, row_base = 0, 0
        try:
            for address, info, stream in zip(self.config.shards, infos, streams):
                try:
                    async for chunk in stream:
                        if chunk.index_version != info.index_version:
                            raise ShardsUnavailableError(f"shard {address} moved from index version "
                                                         f"{info.index_version} to {chunk.index_version} during "
                                                         "the call; retry")
                        out = pb.ScoreAllChunk()
                        out.CopyFrom(chunk)
                        out.offset = entries
                        out.index_version = version
                        del out.rows[:]
                        out.rows.extend(r + row_base for r in chunk.rows)
                        entries += len(chunk.ids)
                        yield out
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise ConfigError(f"shard {address}: {exc.details()}") from None
                    raise ShardsUnavailableError(f"ScoreAll needs every shard; {_describe(address, exc)}") from None
                row_base += int(info.n_samples)
        finally:
            for stream in streams:
                stream.cancel()
        self.version = version

    @rpc(pb.InfoRequest)
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        results = await self._fan_out(self._info, request.SerializeToString(), context)
        shards, answered = [], []
        for address, result in zip(self.config.shards, results):
            if isinstance(result, pb.InfoResponse):
                answered.append(result)
                shards.append({"address": address, "ok": True, "index_version": result.index_version,
                               "n_samples": int(result.n_samples), "index_kind": result.index_kind})
            elif isinstance(result, grpc.RpcError):
                shards.append({"address": address, "ok": False, "error": _describe(address, result)})
            else:
                raise result
        if not answered:
            raise ShardsUnavailableError(f"no shard answered Info ({'; '.join(s['error'] for s in shards)})")
        models = {(i.model_fingerprint, i.tokens, i.sketch_dim) for i in answered}
        if len(models) != 1:
            raise IndexMismatchError(f"the shards serve indexes of different models or token scopes ({shards}); "
                                     "every shard must be built with the same model and options")
        first = answered[0]
        msg = pb.InfoResponse(index_version=VERSION_SEP.join(i.index_version for i in answered),
                              model_name=first.model_name, model_fingerprint=first.model_fingerprint,
                              tokens=first.tokens, n_samples=sum(i.n_samples for i in answered),
                              sketch_dim=first.sketch_dim,
                              index_kind=VERSION_SEP.join(sorted({i.index_kind for i in answered})))
        msg.manifest.update({"router": {"shards": shards}})
        self.version = msg.index_version
        return msg


class RouterServer:
    """A bound grpc.aio router with health (SERVING once started) and optional reflection."""

    def __init__(self, server: grpc.aio.Server, port: int, config: RouterConfig, servicer: RouterServicer,
                 health_servicer: HealthServicer):
        self.server = server
        self.port = port
        self.config = config
        self.servicer = servicer
        self.health = health_servicer

    async def start(self) -> None:
        self.servicer.connect()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Nothing to load: ready once started (kept for the same test helpers as InfluenceServer)."""

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.servicer.close()


def create_router(config: RouterConfig, address: str = "127.0.0.1:0") -> tuple[RouterServer, int]:
    """Build and bind (but do not start) the router; call it with the event loop that will run it.

    Raises:
        ConfigError: the address cannot be bound; a TLS file is unreadable or invalid.
    """
    servicer = RouterServicer(config)
    server, health_servicer, port = build_grpc_server(config, address,
                                                      lambda s: add_influence_handlers(servicer, s))
    return RouterServer(server, port, config, servicer, health_servicer), port


def serve_router(config: RouterConfig, address: str, announce: Callable[[str], None] = print) -> None:
    """Run the router until SIGTERM or SIGINT, then drain for `config.grace_seconds` and return."""

    async def run() -> None:
        server, port = create_router(config, address)
        stop = await start_until_signal(server)
        host = address.rsplit(":", 1)[0]
        announce(f"routing {len(config.shards)} shards ({', '.join(config.shards)}) on {host}:{port}")
        await stop.wait()
        await drain(server, config.grace_seconds, announce)

    asyncio.run(run())
