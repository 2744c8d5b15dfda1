"""The StepScorer RPCs: translate, delegate to the engine, translate back.

Every accepted request gets exactly one answer: a response, an error status (unary), or an in-stream
error message (streaming). Errors cross the wire through `status.to_status` only.

Score and ScoreStream take their requests as raw bytes and are registered in streaming-request form, so
that they run as soon as a call arrives: overload is refused before the payload is read or parsed, and
sizes are checked (stepscore.runtime.limits) before anything is converted or tokenized. ScoreStream's
flow control (bounded in flight, fair share, stalled readers cut off) is `stepscore.runtime.service.streams`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from stepscore.errors import DeadlineExceeded, InvalidRequest, MessageTooLarge, Overloaded, StepscoreError
from stepscore.runtime.engine import Engine
from stepscore.runtime.service.calls import deadline_passed
from stepscore.runtime.service.config import ServerConfig
from stepscore.runtime.service.convert import REPLICA_HEADER, candidate_views, request_from_proto, result_to_proto
from stepscore.runtime.service.metrics import Metrics
from stepscore.runtime.service.status import Status, to_status
from stepscore.runtime.service.streams import StreamShares, pump
from stepscore.runtime.types import AGGREGATES, ScoreResult
from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Undecodable:
    """A request that did not parse (e.g. invalid UTF-8 in a string field): answered INVALID_ARGUMENT
    by the handler, instead of gRPC's generic INTERNAL for a deserializer failure."""

    reason: str


def _safe(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "malformed message")

    return deserialize


def register(servicer: StepScorerServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_StepScorerServicer_to_server, with deserializers that never throw. Score and
    ScoreStream get raw bytes (no deserializer) and run before their request arrives (see the module doc)."""
    handlers = {
        "Score": grpc.stream_unary_rpc_method_handler(servicer.Score, response_serializer=pb.ScoreResponse.SerializeToString),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream, response_serializer=pb.ScoreStreamResponse.SerializeToString
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info,
            request_deserializer=_safe(pb.InfoRequest.FromString),
            response_serializer=pb.InfoResponse.SerializeToString,
        ),
        "EndSearch": grpc.unary_unary_rpc_method_handler(
            servicer.EndSearch,
            request_deserializer=_safe(pb.EndSearchRequest.FromString),
            response_serializer=pb.EndSearchResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["StepScorer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class StepScorerServicer(pb_grpc.StepScorerServicer):
    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._config = config
        self._metrics = metrics
        self._limits = engine.config.limits
        self._streams = StreamShares(
            config.max_stream_inflight, engine.config.max_queued_requests, engine.config.max_queued_tokens
        )
        self.replica_id = config.replica_id  # the server sets the resolved name (host:port) once bound

    # -- helpers --------------------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _not_received(self, deadline: float | None) -> StepscoreError:
        """Why a call ended without its request message (gRPC has answered a message over the limit itself)."""
        if self._past(deadline):
            return DeadlineExceeded("the deadline passed before the request arrived")
        return MessageTooLarge(
            f"no request message arrived: one over the limit of {self._config.max_receive_message_bytes} bytes "
            "is refused before it is read"
        )

    @staticmethod
    def _parse(raw: bytes) -> Any:
        try:
            return pb.ScoreRequest.FromString(raw)
        except DecodeError as exc:
            reason = str(exc) or "malformed message"
            raise InvalidRequest("request", f"not a valid ScoreRequest ({reason}; strings must be UTF-8)") from None

    def _size(self, msg: Any) -> int:
        """The request's size in characters; raises InvalidRequest naming the first field over its limit."""
        self._limits.check_count(len(msg.candidates))  # O(1): before the candidates are looked at
        return self._limits.check(msg.problem, msg.prefix_steps, candidate_views(msg))

    async def _score(self, msg: Any, deadline: float | None) -> ScoreResult:
        return await self._engine.score(request_from_proto(msg, deadline))

    @staticmethod
    def _past(deadline: float | None) -> bool:
        """Whether a call with this absolute deadline (None: none) counts as past it (service.calls' rule)."""
        return deadline_passed(None if deadline is None else deadline - time.monotonic())

    @classmethod
    def _gone(cls, deadline: float | None) -> grpc.StatusCode:
        # grpc cancels the handler when the call's deadline passes, which can come just before the engine's
        # own deadline check: count that as the deadline it is, not as a client cancelling.
        return grpc.StatusCode.DEADLINE_EXCEEDED if cls._past(deadline) else grpc.StatusCode.CANCELLED

    def _replica(self) -> tuple[tuple[str, str], ...]:
        return ((REPLICA_HEADER, self.replica_id),)

    def _observe(self, method: str, code: grpc.StatusCode, started: float, result: ScoreResult | None) -> None:
        if self._metrics is not None:
            self._metrics.observe_request(method, code.name, time.perf_counter() - started, result)

    # -- RPCs -----------------------------------------------------------------------------------

    async def Score(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        """Runs when the call arrives (registered stream-unary): admission first, then the one message."""
        del request_iterator  # the message is read through the context, after admission
        started = time.perf_counter()
        deadline = self._deadline(context)
        failure: Exception | None = None
        try:
            self._engine.check_admission()  # overloaded or draining: refused before the payload is read
            result = await self._receive_and_score(context, deadline)
        except asyncio.CancelledError:  # the client went away: the engine already dropped the work
            self._observe("Score", self._gone(deadline), started, None)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes exactly one status
            failure = exc
        if failure is not None:
            status = to_status(failure)
            # Let go of the failure, and with its traceback of the frames that held the request, before aborting:
            # gRPC keeps abort's own exception in a reference cycle with the call, which only the garbage
            # collector breaks; whatever it reached (15 MB of a refused problem, say) would stay until then.
            del failure
            self._observe("Score", status.code, started, None)
            # an error names its replica in the trailers: initial metadata would make it a committed response,
            # and gRPC clients never retry those (a draining replica's UNAVAILABLE must stay retryable)
            await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata() + self._replica())
        self._observe("Score", grpc.StatusCode.OK, started, result)
        # sent with the answer, not on arrival: a call whose replica dies before it answers has received
        # nothing yet, so the client's retry policy may still send it to another replica
        await context.send_initial_metadata(self._replica())
        return result_to_proto(result)

    async def _receive_and_score(self, context: grpc.aio.ServicerContext, deadline: float | None) -> ScoreResult:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            raise self._not_received(deadline)
        msg = self._parse(raw)
        del raw
        self._size(msg)
        return await self._score(msg, deadline)

    async def ScoreStream(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """Reads and writes through the context, so that it can stop reading (flow control) and notice a
        client that stops reading (stepscore.runtime.service.streams)."""
        del request_iterator
        # the replica's name first: a stream is routed once, and its client reads the name before any answer
        await context.send_initial_metadata(self._replica())
        seen: set[str] = set()
        stream_deadline = self._deadline(context)

        def error(request_id: str, exc: BaseException, started: float) -> Any:
            status = to_status(exc)
            self._observe("ScoreStream", status.code, started, None)
            error = pb.Error(code=status.code.value[0], message=status.message, field=status.field, error_id=status.error_id)
            return pb.ScoreStreamResponse(request_id=request_id, error=error)

        async def answer(msg: Any, started: float) -> Any:
            try:
                if not msg.request_id:
                    raise InvalidRequest("request_id", "is required on a stream (responses come back out of order)")
                if msg.request_id in seen:
                    raise InvalidRequest("request_id", f"{msg.request_id!r} is already in flight on this stream")
                seen.add(msg.request_id)
                try:
                    result = await self._score(msg, stream_deadline)
                finally:
                    seen.discard(msg.request_id)
            except asyncio.CancelledError:
                self._observe("ScoreStream", self._gone(stream_deadline), started, None)
                raise
            except Exception as exc:  # noqa: BLE001 - reported in the stream; the stream goes on
                return error(msg.request_id, exc, started)
            self._observe("ScoreStream", grpc.StatusCode.OK, started, result)
            return pb.ScoreStreamResponse(request_id=msg.request_id, response=result_to_proto(result))

        async def failed(request_id: str, exc: BaseException, started: float) -> Any:
            return error(request_id, exc, started)

        def prepare(raw: bytes) -> tuple[int, Callable[[], Awaitable[Any]]]:
            started = time.perf_counter()
            try:
                msg = self._parse(raw)
            except StepscoreError as exc:
                return 0, functools.partial(failed, "", exc, started)
            try:
                chars = self._size(msg)
            except StepscoreError as exc:
                return 0, functools.partial(failed, msg.request_id, exc, started)
            return chars, functools.partial(answer, msg, started)

        async def read() -> bytes | None:
            raw = await context.read()
            return None if raw is grpc.aio.EOF else bytes(raw)

        quota = self._streams.open()
        stalled: Status | None = None
        try:
            await pump(read, prepare, context.write, quota, self._config.stream_stall_seconds)
        except Overloaded as exc:  # the client stopped reading: cut off, its work already dropped
            stalled = to_status(exc)
        finally:
            quota.close()
        if stalled is not None:  # aborted outside the handler, so that nothing the stream held stays reachable (see Score)
            if self._metrics is not None:
                self._metrics.stream_stalls.inc()
            await context.abort(stalled.code, stalled.message, trailing_metadata=stalled.trailing_metadata())

    async def Info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        del request  # no fields
        await context.send_initial_metadata(self._replica())
        info = self._engine.info()
        cfg = self._engine.config
        return pb.InfoResponse(
            model=info.model,
            family=info.family,
            preset=info.preset,
            precision=info.precision,
            max_seq_len=info.max_seq_len,
            max_batch_tokens=info.max_batch_tokens,
            max_queued_requests=cfg.max_queued_requests,
            max_queued_tokens=cfg.max_queued_tokens,
            max_receive_message_bytes=self._config.max_receive_message_bytes,
            max_send_message_bytes=self._config.max_send_message_bytes,
            devices=list(info.devices),
            aggregates=list(AGGREGATES),
            stepscore_version=info.stepscore_version,
            onnxruntime_version=info.onnxruntime_version,
            grpc_version=grpc.__version__,
            format_description=info.manifest["format"].get("description", ""),
            manifest_json=json.dumps(info.manifest),
            max_candidates=self._limits.max_candidates,
            max_steps_per_candidate=self._limits.max_steps,
            max_problem_chars=self._limits.max_problem_chars,
            max_step_chars=self._limits.max_step_chars,
            max_request_chars=self._limits.max_request_chars,
            max_stream_inflight=self._config.max_stream_inflight,
            stream_stall_seconds=self._config.stream_stall_seconds,
            replica_id=self.replica_id,
            prefix_cache_bytes=self._engine.cache.budget_bytes if self._engine.cache is not None else 0,
        )

    async def EndSearch(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            freed = self._engine.end_search(request.search_id)
        except Exception as exc:  # noqa: BLE001 - every failure becomes exactly one status
            status = to_status(exc)
            await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata() + self._replica())
        await context.send_initial_metadata(self._replica())
        return pb.EndSearchResponse(freed_bytes=freed)
