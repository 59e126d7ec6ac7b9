"""The few error types forvalue raises on purpose.

Each subclasses a builtin so callers can catch either; messages say what is wrong and what to change.
The CLI maps every ForValueError to a one-line message and exit code 2.
"""

from __future__ import annotations

from typing import Any


class ForValueError(Exception):
    """Base of every error forvalue raises for a user's mistake (bad input, wrong model, bad index)."""


class DataError(ForValueError, ValueError):
    """A data file or one of its rows is unusable.

    Args:
        message: what is wrong and what to do.
        path: the file (or directory) concerned, if any.
        row: the 0-based row number inside that file, if any.
    """

    def __init__(self, message: str, path: str | None = None, row: int | None = None):
        self.path = path
        self.row = row
        where = ""
        if path is not None:
            where = f"{path}"
            if row is not None:
                where += f", row {row}"
            where += ": "
        super().__init__(where + message)


class ModelError(ForValueError, ValueError):
    """A model path is missing, unreadable or not a causal language model."""


class ConfigError(ForValueError, ValueError):
    """An option has an invalid value."""


class IndexMismatchError(ForValueError, ValueError):
    """An index was built with another model, tokenizer or token scope than the one asked for."""


class IndexCorruptError(ForValueError, ValueError):
    """An index file fails its checksum or cannot be read; the message names the file."""


class IndexChangedError(ForValueError, RuntimeError):
    """An update (build, add, takedown) would publish over a CURRENT that moved while it ran: refused, so that
    what the other update published is never hidden (run it again from the new CURRENT)."""


class RecallTooLowError(ForValueError, ValueError):
    """An approximate first stage measured a recall against flat search below the required minimum."""


# --- takedowns and the service (mapped to gRPC status codes in server/status.py) -----------------------


class UnknownIdsError(DataError):
    """Ids to delete that are in no row of the index (nothing was deleted)."""


class NotReadyError(ForValueError, RuntimeError):
    """The server is still loading its model and index (or failed to), or is stopping."""


class ResourceExhaustedError(ForValueError, RuntimeError):
    """The queue of requests waiting for the model is full (max_queue); retry later."""


class DeadlineExceededError(ForValueError, TimeoutError):
    """The call's deadline passed before its request reached the model (it never did)."""


class InvalidRequestError(ConfigError):
    """A request field has an invalid value; `field` names it (e.g. "samples[2].response")."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ShardsUnavailableError(NotReadyError):
    """One or more shards did not answer (and the caller did not allow a partial answer): UNAVAILABLE."""


class ServerError(ForValueError, RuntimeError):
    """A call to the influence service failed.

    Attributes:
        code: the grpc.StatusCode (None when the server broke the protocol). details: the server's message.
    """

    def __init__(self, address: str, code: Any, details: str):
        self.code = code
        self.details = details
        super().__init__(f"server {address}: {code.name if code else 'protocol error'}: {details}")
