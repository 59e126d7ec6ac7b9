"""The Python client of the influence service, with the calls and result types of the in-process `Index`.

    with InfluenceClient("127.0.0.1:50051") as c:
        res = c.search([("Translate: chat ->", " cat")], k=10)      # forvalue.indexer.index.SearchResult
        ids, scores = c.score_all(valuation_pairs)                  # every training row's value

Every failed call raises `ServerError` (a ForValueError) carrying the gRPC status code and the server's
message, e.g. "server 127.0.0.1:50051: INVALID_ARGUMENT: k: must be between 1 and 1000, got 0"; a call that
reached no server at all raises its subclass `ServerUnreachableError`, with a message for people instead of
grpc's connection text. `wait_until_ready(seconds)` waits for a server that is still starting (what the CLI's
`--wait` does before its first call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forvalue.indexer.data import Sample
from forvalue.indexer.errors import ConfigError, ForValueError, ServerError
from forvalue.indexer.filters import Where, as_where
from forvalue.indexer.results import (
    DEFAULT_EXACT_BUDGET, DEFAULT_K, DEFAULT_RERANK, DEFAULT_SCORE_BATCH, GroupedResult, Scores, SearchResult,
    check_direction,
)
from forvalue.server import convert
from forvalue.server.protocol import pb, pb_grpc

WhereLike = Where | Mapping[str, Any] | Sequence[str] | None

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServerUnreachableError(ServerError):
    """No forvalue server answers at the address: nothing listens there, or it did not come up in time.
    The CLI exits with code 3 (EXIT_UNREACHABLE) on it, not 2: the command line may be right, the server is not up."""

    def __init__(self, address: str, waited: float):
        self.code, self.details, self.waited = grpc.StatusCode.UNAVAILABLE, "", waited
        after = f"after {waited:g} s" if waited > 0 else "(without waiting: --wait 0)"
        ForValueError.__init__(self, f"cannot reach forvalue server at {address} {after}; is `forvalue serve` "
                                     "running there?")


class ServerNotReadyError(ServerUnreachableError):
    """A forvalue server answers at the address but was still loading its model and index when the wait ended."""

    def __init__(self, address: str, waited: float, status: str):
        self.code, self.details, self.waited = grpc.StatusCode.UNAVAILABLE, status, waited
        ForValueError.__init__(self, f"the forvalue server at {address} is still loading its model and index after "
                                     f"{waited:g} s (health {status}); wait longer (--wait SECONDS) or see its log")


# how grpc itself words a call that found no server (a server's own UNAVAILABLE, e.g. a router naming a down shard,
# may quote these words but never starts with them)
_NO_SERVER = ("failed to connect to all addresses", "dns resolution failed", "errors resolving", "empty address list")


def _is_connection_failure(exc: grpc.RpcError) -> bool:
    """Whether a failed call never reached a server (refused, unresolvable), as opposed to a server that answered
    UNAVAILABLE itself (still loading, draining, a router whose shard is down)."""
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and details.startswith(_NO_SERVER)


def _credentials(tls: bool | str | None) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    try:
        with open(tls, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    except OSError as exc:
        raise ConfigError(f"tls: cannot read the root certificates {tls!r}: {exc.strerror}") from exc


class InfluenceClient:
    """A connection to a forvalue influence server.

    Args:
        address: host:port of the server.
        token: sent as `authorization: Bearer <token>` metadata with every call, if given.
        tls: None or False = plaintext; True = TLS with the system's root certificates; a path = TLS with
            the root certificates in that PEM file.
        timeout: deadline of every call in seconds (None = none).
    """

    def __init__(self, address: str, token: str | None = None, tls: bool | str | None = None,
                 timeout: float | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        creds = _credentials(tls)
        self._channel = (grpc.insecure_channel(address, options=options) if creds is None
                         else grpc.secure_channel(address, creds, options=options))
        self._stub = pb_grpc.InfluenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _error(self, exc: grpc.RpcError) -> ServerError:
        if _is_connection_failure(exc):
            return ServerUnreachableError(self.address, 0.0)
        return ServerError(self.address, exc.code(), exc.details() or "")

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def wait_until_ready(self, seconds: float, poll: float = 0.2) -> None:
        """Wait up to `seconds` for the server to accept connections and report SERVING (grpc.health.v1):
        a server that is still starting (listening, model and index loading) is waited for, not failed.

        Raises:
            ServerUnreachableError: nothing answered at the address within `seconds`.
            ServerNotReadyError: the server answered but was not SERVING within `seconds`.
            ServerError: the health check itself failed otherwise.
        """
        import time

        deadline = time.monotonic() + max(seconds, 0.0)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(seconds, 0.0))
        except grpc.FutureTimeoutError:
            raise ServerUnreachableError(self.address, seconds) from None
        status = "UNKNOWN"
        while True:
            left = deadline - time.monotonic()
            try:
                reply = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                           timeout=max(left, poll), wait_for_ready=True)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise self._error(exc) from None
            if status == "SERVING":
                return
            if time.monotonic() + poll > deadline:
                raise ServerNotReadyError(self.address, seconds, status)
            time.sleep(poll)

    def search(self, samples: Sequence[Sample | tuple[str, str]], k: int = DEFAULT_K, direction: str = "most",
               rerank: int = DEFAULT_RERANK, explain: int = 0, where: WhereLike = None, scores: str = "exact",
               exact_budget: int = DEFAULT_EXACT_BUDGET) -> SearchResult:
        """Top-k most (or least) valuable training samples for the group `samples`, as `Index.search`.

        Args:
            k: answers wanted (at most the server's cap).
            direction: "most" or "least".
            rerank: first-stage candidates scored exactly (raised to k, as in-process).
            explain: > 0: every hit carries an `Explanation` with this many top token pairs (at most the
                server's cap).
            where: only training samples whose metadata match (a `Where`, {field: value or [values]}, or
                "FIELD=VALUE" strings), as `Index.search(..., where=...)`.
            scores: "exact", or "certified": hits with certified score intervals (`Index.search`).
            exact_budget: certified answers: candidates at most scored exactly to tighten the intervals.
        """
        check_direction(direction)
        return self.top_k(samples, k, direction, rerank, group=True, explain=explain, where=where, scores=scores,
                          exact_budget=exact_budget)[0][1]

    def group_by(self, samples: Sequence[Sample | tuple[str, str]], field: str, k: int = 3, direction: str = "most",
                 where: WhereLike = None) -> GroupedResult:
        """Total and mean value per value of metadata `field`, with each group's top-k rows, as `Index.group_by`."""
        check_direction(direction)
        request = pb.TopKRequest(samples=convert.samples_to_pb(samples), k=k,
                                 direction=convert.direction_to_pb(direction),
                                 group=True, group_by=field, where=convert.where_to_pb(as_where(where)))
        response = self._call(self._stub.TopK, request)
        return convert.grouped_result(response.answers[0], response.index_version, field)

    def delete(self, ids: Sequence[str], ignore_missing: bool = False) -> dict:
        """Admin: take down training samples (a new index version without them, then served); the server must
        run with --enable-admin. Returns index_version, deleted, already_deleted, unknown, hidden_rows."""
        stub = pb_grpc.InfluenceAdminStub(self._channel)
        reply = self._call(stub.Delete, pb.DeleteRequest(ids=[str(i) for i in ids], ignore_missing=ignore_missing))
        return {"index_version": reply.index_version, "deleted": list(reply.deleted),
                "already_deleted": list(reply.already_deleted), "unknown": list(reply.unknown),
                "hidden_rows": reply.hidden_rows}

    def top_k(self, samples: Sequence[Sample | tuple[str, str]], k: int = DEFAULT_K, direction: str = "most",
              rerank: int = DEFAULT_RERANK, group: bool = True, max_text_chars: int = 0, explain: int = 0,
              where: WhereLike = None, scores: str = "exact", exact_budget: int = DEFAULT_EXACT_BUDGET
              ) -> list[tuple[int, SearchResult]]:
        """Every answer of a TopK call: [(query index, or -1 for the group, result)], per direction.

        Args:
            direction: "most", "least" or "both" (two answers per query: most, then least).
            group: one answer for the mean of `samples`; False: one per sample.
            max_text_chars: cut returned prompts and responses to this many characters (0 = whole).
            explain: > 0: every hit carries an `Explanation` with this many top token pairs, as
                `Index.search(..., explain=...)`; 0 = none.
            scores, exact_budget: exact scores, or certified intervals (`search`).
        """
        if exact_budget < 0:
            raise ConfigError(f"exact_budget must be >= 0 (candidates scored exactly), got {exact_budget}")
        if explain < 0:
            raise ConfigError(f"explain must be >= 0 (top token pairs per hit; 0 = no explanation), got {explain}")
        request = pb.TopKRequest(samples=convert.samples_to_pb(samples), k=k,
                                 direction=convert.direction_to_pb(direction),
                                 rerank=rerank if rerank < 0 else max(rerank, k), group=group,
                                 max_text_chars=max_text_chars, explain=explain > 0, explain_pairs=explain,
                                 where=convert.where_to_pb(as_where(where)), scores=convert.scores_to_pb(scores),
                                 exact_budget=exact_budget or -1)  # 0 on the wire is the server's default
        response = self._call(self._stub.TopK, request)
        return [(a.query_index, convert.search_result(a, response.index_version)) for a in response.answers]

    def score_all(self, samples: Sequence[Sample | tuple[str, str]], chunk_size: int = 0,
                  return_version: bool = False, where: WhereLike = None
                  ) -> tuple[list[str], np.ndarray] | tuple[list[str], np.ndarray, str]:
        """The exact value of every training row in scope to the group `samples` (one ScoreAll call), as
        `Index.score_all`.

        Args:
            chunk_size: rows per streamed chunk (0 = the server's default).
            return_version: also return the index version that answered.

        Returns:
            (ids in row order, scores (n,) float64), and the version ("" for an empty index) if asked.
        """
        s = self._score_all(samples, chunk_size, where)
        return (s.ids, s.values, s.version) if return_version else (s.ids, s.values)

    def scores(self, samples: Sequence[Sample | tuple[str, str]], where: WhereLike = None,
               batch: int = DEFAULT_SCORE_BATCH) -> Scores:
        """The exact value of every training row in scope to the group `samples` (the mean over all of them),
        as `Index.scores`: one ScoreAll call per `batch` samples (so a valuation set larger than the server's
        per-request limit works), their means combined by sample count.

        Raises:
            ServerError: a call failed, or the calls were answered by different index versions (the index
                changed in between: run again).
        """
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        if not samples:
            raise ConfigError("scores needs at least one valuation sample")
        first, total, cut, calls = None, None, [], 0
        for a in range(0, len(samples), batch):
            calls += 1
            part = self._score_all(samples[a : a + batch], 0, where)
            cut += [a + j for j in part.cut_samples]
            if first is None:
                first, total = part, part.values * len(samples[a : a + batch])
                continue
            if part.version != first.version or part.rows != first.rows:
                raise ServerError(self.address, None, f"the index changed between calls ({first.version} → "
                                                      f"{part.version}); run again")
            total = total + part.values * len(samples[a : a + batch])
        # a row's cosine is to the whole group's mean G: known from one call only (it is not a mean of calls')
        return Scores(first.ids, first.rows, total / len(samples), first.version, tuple(cut),
                      cosines=first.cosines if calls == 1 else None)

    def _score_all(self, samples, chunk_size: int, where: WhereLike) -> Scores:
        request = pb.ScoreAllRequest(samples=convert.samples_to_pb(samples), chunk_size=chunk_size,
                                     where=convert.where_to_pb(as_where(where)))
        ids: list[str] = []
        rows: list[int] = []
        scores: list[float] = []
        cosines: list[float] = []
        cut: list[int] = []
        versions = set()
        try:
            for chunk in self._stub.ScoreAll(request, timeout=self.timeout, metadata=self._metadata):
                if chunk.offset != len(ids) or len(chunk.ids) != len(chunk.scores):
                    raise ServerError(self.address, None, f"ScoreAll chunk at offset {chunk.offset} does not "
                                                          f"follow row {len(ids)}")
                ids.extend(chunk.ids)
                rows.extend(chunk.rows)
                cut.extend(chunk.cut_samples)
                scores.extend(chunk.scores)
                cosines.extend(chunk.cosines)
                versions.add(chunk.index_version)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        if len(versions) > 1:
            raise ServerError(self.address, None, f"ScoreAll mixed index versions {', '.join(sorted(versions))}")
        # cosines: every entry's, or none (an index without norms; through a router, a shard without them)
        cos = np.asarray(cosines, dtype=np.float64) if ids and len(cosines) == len(ids) else None
        return Scores(ids, rows, np.asarray(scores, dtype=np.float64), next(iter(versions), ""), tuple(cut),
                      cosines=cos)

    def info(self) -> dict:
        """The serving index: index_version, model_name, model_fingerprint, tokens, n_samples, sketch_dim,
        index_kind and its manifest (without file checksums), as `Index.info`."""
        return convert.info_dict(self._call(self._stub.Info, pb.InfoRequest()))

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
