"""One error hierarchy for the whole project.

Every failure a user can cause or meet is one of these types. The gRPC service and both Python clients map
them to and from status codes through one table (`stepscore.runtime.service.status`); the CLIs print
`str(error)` as one line. Messages say what was wrong and what to do instead.
"""

from __future__ import annotations

import logging
import uuid


class StepscoreError(Exception):
    """Base class of every error stepscore raises on purpose."""


class ConfigError(StepscoreError):
    """A setting is invalid or contradicts another one; raised at start-up, never mid-flight."""


# --- request errors (the caller can fix them) -------------------------------------------------


class InvalidRequest(StepscoreError):
    """The request is malformed. `field` names the offending field (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextTooLong(InvalidRequest):
    """A candidate does not fit the model's context and the request did not ask for truncation."""


class Overloaded(StepscoreError):
    """The queue is full (requests or tokens). Retry later or lower the load."""


class MessageTooLarge(StepscoreError):
    """A request message is over the advertised size limit (InfoResponse.max_receive_message_bytes); gRPC
    refuses it before it is read, with its own RESOURCE_EXHAUSTED."""


class DeadlineExceeded(StepscoreError):
    """The request's deadline passed before its scores were computed."""


class Cancelled(StepscoreError):
    """The caller gave up on the request."""


class Unavailable(StepscoreError):
    """The engine is not ready (warming up) or is shutting down."""


class Unauthenticated(StepscoreError):
    """Missing or wrong credentials."""


# --- server-side errors ------------------------------------------------------------------------


class InternalError(StepscoreError):
    """A failure inside the server that the caller cannot fix (a bug, a failed model run). The caller gets
    only `error_id`; the server log has the details under the same id."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (error id {error_id}; the server log has the details)")
        self.error_id = error_id


def report_internal(logger: logging.Logger, exc: BaseException, what: str) -> InternalError:
    """Log an unexpected exception with its traceback under a fresh error id; return what the caller may see.
    Nothing of the exception's text or type reaches the caller."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s (error id %s)", what, error_id, exc_info=exc)
    return InternalError(error_id)


class ModelOutputError(StepscoreError):
    """The model produced NaN or inf for this request: it is reported, never returned as a score."""


class BundleError(StepscoreError):
    """A bundle is missing, of an unknown schema, or does not match its recorded hashes."""


class ExportError(StepscoreError):
    """Export cannot proceed: unsupported architecture, missing tokenizer, a tag that is not one token."""


class ValidationFailed(ExportError):
    """The exported graph disagrees with the PyTorch reference by more than the tolerance."""
