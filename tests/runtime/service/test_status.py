"""The one error table: every row survives the round trip server -> wire -> client, the field travels with
unary errors as with stream errors, and an unexpected exception reaches the client as INTERNAL with an error
id and nothing of its text."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from stepscore.errors import (
    BundleError,
    Cancelled,
    ConfigError,
    ContextTooLong,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelOutputError,
    Overloaded,
    StepscoreError,
    Unauthenticated,
    Unavailable,
)
from stepscore.runtime.client import AsyncClient
from stepscore.runtime.config import EngineConfig
from stepscore.runtime.service.config import ServerConfig
from stepscore.runtime.service.servicer import StepScorerServicer, register
from stepscore.runtime.service.status import TABLE, from_status, to_status
from stepscore.runtime.types import ScoreRequest, ScoreResult

SECRET = "secret-path /home/alice/model"

EXAMPLES: list[StepscoreError] = [
    InvalidRequest("candidates[2].steps[0]", "is empty"),
    ContextTooLong("candidates[0]", "has 900 tokens; the model takes 512"),
    Overloaded("queue full"),
    DeadlineExceeded("the deadline passed"),
    Cancelled("the caller gave up"),
    Unavailable("shutting down"),
    Unauthenticated("missing token"),
    InternalError("0123456789ab"),
    ModelOutputError("NaN for candidate 0"),
    BundleError("hash mismatch"),
    ConfigError("bad setting"),
]


def test_every_error_type_has_a_row() -> None:
    covered = {cls for cls, _ in TABLE}
    for exc in EXAMPLES:
        assert any(isinstance(exc, cls) for cls in covered), type(exc)


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_keeps_type_field_and_id(exc: StepscoreError) -> None:
    status = to_status(exc)
    back = from_status(status.code, status.message, status.field, status.error_id)
    # the client gets the most general type of the code's row (ContextTooLong comes back as InvalidRequest)
    if status.code == grpc.StatusCode.INTERNAL and not status.error_id:
        # an INTERNAL without the server's error id could be gRPC's own: the client keeps it general
        assert type(back) is StepscoreError and str(exc) in str(back)
        return
    row = next(cls for cls, code in TABLE if code == status.code)
    assert isinstance(back, row)
    if isinstance(exc, InvalidRequest):
        assert isinstance(back, InvalidRequest)
        assert (back.field, back.message) == (exc.field, exc.message)
    if isinstance(exc, InternalError):
        assert isinstance(back, InternalError) and back.error_id == exc.error_id


def test_unexpected_exception_is_internal_with_an_id_and_no_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        status = to_status(KeyError(SECRET))
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.error_id and status.error_id in status.message
    assert "secret" not in status.message and "KeyError" not in status.message
    logged = [r for r in caplog.records if status.error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the server log under that id


class FaultyEngine:
    """Stands in for the engine: raises what the test asks for."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.config = EngineConfig()

    def check_admission(self) -> None:
        """Admits every call."""

    async def score(self, request: ScoreRequest) -> ScoreResult:
        raise self.exc


async def _call_both(exc: BaseException) -> tuple[BaseException, StepscoreError | None]:
    server = grpc.aio.server()
    engine: Any = FaultyEngine(exc)
    register(StepScorerServicer(engine, ServerConfig()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(StepscoreError) as unary:
                await client.score("p", [["a"]])
            items = [item async for item in client.score_stream([ScoreRequest("p", [["a"]], request_id="r1")])]
        return unary.value, items[0].error
    finally:
        await server.stop(None)


def test_unary_and_stream_carry_the_field() -> None:
    unary, streamed = asyncio.run(_call_both(InvalidRequest("candidates[0].steps[3]", "is empty")))
    for err in (unary, streamed):
        assert isinstance(err, InvalidRequest)
        assert err.field == "candidates[0].steps[3]" and err.message == "is empty"


def test_unexpected_error_reaches_both_clients_as_internal_with_the_logged_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        unary, streamed = asyncio.run(_call_both(RuntimeError(SECRET)))
    ids = set()
    for err in (unary, streamed):
        assert isinstance(err, InternalError), err
        assert "secret" not in str(err) and "RuntimeError" not in str(err)
        ids.add(err.error_id)
    assert len(ids) == 2  # one id per failure
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(error_id in logged for error_id in ids)
