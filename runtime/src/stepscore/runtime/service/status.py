"""stepscore errors <-> gRPC status codes: the one table, read in both directions.

The server turns an exception into (code, message, field) with `to_status`; the unary handler sends the field
(and an internal error's id) as trailing metadata, the stream handler inside its `Error` message. Both Python
clients turn a status back into the same exception type with `from_status`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from stepscore.errors import (
    BundleError,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    MessageTooLarge,
    ModelOutputError,
    Overloaded,
    StepscoreError,
    Unauthenticated,
    Unavailable,
    report_internal,
)

log = logging.getLogger(__name__)

# trailing metadata of a failed unary call
FIELD_KEY = "stepscore-field"
ERROR_ID_KEY = "stepscore-error-id"

# exception type -> status code; subclasses match their base's row (ContextTooLong is an InvalidRequest).
# Read back, the first row with a code gives the type a client raises.
TABLE: tuple[tuple[type[StepscoreError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (InternalError, grpc.StatusCode.INTERNAL),
    (ModelOutputError, grpc.StatusCode.INTERNAL),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    field: str = ""  # the offending request field (dotted path) of an INVALID_ARGUMENT
    error_id: str = ""  # an INTERNAL error's id in the server log

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in ((FIELD_KEY, self.field), (ERROR_ID_KEY, self.error_id)) if v)


def to_status(exc: BaseException) -> Status:
    """The status for any exception. An unexpected one is logged with its traceback under an error id and
    reaches the client as INTERNAL with that id only: nothing of its text leaves the server."""
    if not isinstance(exc, StepscoreError):
        exc = report_internal(log, exc, "unexpected error while handling a request")
    for cls, code in TABLE:
        if isinstance(exc, cls):
            # the message names the field too ("candidates[0].steps[1]: is empty"): readable without the trailer
            return Status(code, str(exc), getattr(exc, "field", ""), getattr(exc, "error_id", ""))
    # a StepscoreError type the table does not list is a bug here, not the caller's business
    return to_status(RuntimeError(f"{type(exc).__name__} has no row in the status table: {exc}"))


def code_from_number(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


def from_status(code: grpc.StatusCode, message: str, field: str = "", error_id: str = "") -> StepscoreError:
    """The exception a client raises for a status (the inverse of `to_status`)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = field or (message.split(": ", 1)[0] if ": " in message else "request")
        return InvalidRequest(field, message.removeprefix(field + ": "))
    if code == grpc.StatusCode.INTERNAL:
        # with an id: the server's own report; without: gRPC's (transport, a peer that is not stepscore)
        return InternalError(error_id) if error_id else StepscoreError(f"{code.name}: {message}")
    cls = next((c for c, k in TABLE if k == code), StepscoreError)
    return cls(f"{code.name}: {message}")


def from_rpc_error(err: grpc.RpcError) -> StepscoreError:
    """The exception for a failed call, reading the field and error id from its trailing metadata."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else ""
    trailer: Sequence[tuple[str, str | bytes]] = (err.trailing_metadata() if hasattr(err, "trailing_metadata") else None) or ()
    meta = {k: v if isinstance(v, str) else v.decode() for k, v in trailer}
    return from_status(code, details or "", meta.get(FIELD_KEY, ""), meta.get(ERROR_ID_KEY, ""))
