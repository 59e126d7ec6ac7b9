"""The one place where exceptions become gRPC status codes, and where request bytes are parsed.

`rpc(RequestType)` decorates a servicer method (a coroutine, or an async generator for server streaming):
the handler is registered with raw bytes in (see `servicer.add_to_server`), so a malformed message is
answered INVALID_ARGUMENT here instead of grpc.aio's UNKNOWN. Then:

| raised                                             | status              |
|----------------------------------------------------|---------------------|
| NotReadyError (model and index still loading)      | UNAVAILABLE         |
| ResourceExhaustedError (the model's queue is full) | RESOURCE_EXHAUSTED  |
| DeadlineExceededError (expired before the model)   | DEADLINE_EXCEEDED   |
| IndexMismatchError, IndexCorruptError, ModelError  | FAILED_PRECONDITION |
| UnknownIdsError (admin Delete of ids in no row)    | NOT_FOUND           |
| IndexChangedError (CURRENT moved during an update) | ABORTED (retry)     |
| any other ForValueError (a bad request)            | INVALID_ARGUMENT    |
| anything else                                      | INTERNAL, logged with its traceback |

Cancellation (asyncio.CancelledError) and `context.abort` pass through untouched.

It also times every call and counts its status (`metrics.Call`, on the servicer's `metrics`), and gives it
a request id, sent back as `x-request-id` trailing metadata and written to the access log.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging

import grpc
from google.protobuf.message import DecodeError

from forvalue.indexer.errors import (
    DeadlineExceededError, ForValueError, IndexChangedError, IndexCorruptError, IndexMismatchError, InvalidRequestError,
    ModelError, NotReadyError, ResourceExhaustedError, UnknownIdsError,
)

from .metrics import Call

log = logging.getLogger("forvalue.server")


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (IndexMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (IndexCorruptError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownIdsError, grpc.StatusCode.NOT_FOUND),
    (IndexChangedError, grpc.StatusCode.ABORTED),
    (ForValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception raised while answering (INTERNAL when it is not ours)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, call: Call, exc: Exception, version: str | None):
    """Answer the call with `exc`'s status (called inside the `except` block, so the traceback is logged)."""
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly (request id %s)", call.method, call.request_id)
        message = f"internal error in {call.method} ({type(exc).__name__}); see the server log"
    else:
        message = str(exc)
    call.finish(code, version)
    await context.abort(code, message, trailing_metadata=call.trailing_metadata)


def _aborted(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a handler's own `context.abort` set."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _parse(request_type, raw: bytes):
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequestError("request", f"not a valid {request_type.DESCRIPTOR.full_name} message ({exc})"
                                  ) from exc


def rpc(request_type):
    """Decorate a servicer method: parse its raw request as `request_type`, map its errors to statuses.

    The servicer (`self`) has `metrics` (a `metrics.Metrics`) and `version` (the version served, or None).
    """

    def wrap(fn):
        method = fn.__name__
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream(self, raw, context):
                call = self.metrics.begin(method, context)
                version = None
                try:
                    request = _parse(request_type, raw)
                    call.n_samples = len(getattr(request, "samples", ()))
                    async for item in fn(self, request, context):
                        version = item.index_version
                        yield item
                except grpc.aio.AbortError:
                    call.finish(_aborted(context), version or self.version)
                    raise
                except asyncio.CancelledError:
                    call.finish(grpc.StatusCode.CANCELLED, version or self.version)
                    raise
                except Exception as exc:
                    await _abort(context, call, exc, version or self.version)
                call.finish(grpc.StatusCode.OK, version or self.version)

            return stream

        @functools.wraps(fn)
        async def unary(self, raw, context):
            call = self.metrics.begin(method, context)
            try:
                request = _parse(request_type, raw)
                call.n_samples = len(getattr(request, "samples", ()))
                response = await fn(self, request, context)
            except grpc.aio.AbortError:
                call.finish(_aborted(context), self.version)
                raise
            except asyncio.CancelledError:
                call.finish(grpc.StatusCode.CANCELLED, self.version)
                raise
            except Exception as exc:
                await _abort(context, call, exc, self.version)
            # counted before the status is sent (here and in _abort), so a scrape after the reply sees it
            call.finish(grpc.StatusCode.OK, response.index_version)
            return response

        return unary

    return wrap
