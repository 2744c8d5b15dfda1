"""stepscore errors -> gRPC status codes. The one and only mapping."""

from __future__ import annotations

import logging

import grpc

from stepscore.errors import (
    BundleError,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    MessageTooLarge,
    ModelOutputError,
    Overloaded,
    StepscoreError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[StepscoreError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),  # includes ContextTooLong
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MessageTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ModelOutputError, grpc.StatusCode.INTERNAL),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, field) for any exception. Unexpected ones are logged with their traceback and
    reach the client as a bare INTERNAL: no stack trace or internals leave the server."""
    if isinstance(exc, StepscoreError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                return code, str(exc), getattr(exc, "field", "")
        return grpc.StatusCode.INTERNAL, str(exc), ""
    log.error("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error", ""
