"""The StepScorer RPCs: translate, delegate to the engine, translate back.

Every accepted request gets exactly one answer: a response, an error status (unary), or an in-stream
error message (streaming). Errors cross the wire through `status.to_status` only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from stepscore.errors import InvalidRequest
from stepscore.runtime.engine import Engine
from stepscore.runtime.service.config import ServerConfig
from stepscore.runtime.service.convert import REPLICA_HEADER, request_from_proto, result_to_proto
from stepscore.runtime.service.metrics import Metrics
from stepscore.runtime.service.status import to_status
from stepscore.runtime.types import AGGREGATES, ScoreResult
from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc

# A cancellation this close to the call's deadline is the deadline firing (time_remaining is read on entry).
_DEADLINE_SLACK_S = 0.05


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
    """Like the generated add_StepScorerServicer_to_server, with deserializers that never throw."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=_safe(pb.ScoreRequest.FromString),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream,
            request_deserializer=_safe(pb.ScoreRequest.FromString),
            response_serializer=pb.ScoreStreamResponse.SerializeToString,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info,
            request_deserializer=_safe(pb.InfoRequest.FromString),
            response_serializer=pb.InfoResponse.SerializeToString,
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
        self.replica_id = config.replica_id  # the server sets the resolved name (host:port) once bound

    # -- helpers --------------------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def _score(self, msg: Any, deadline: float | None) -> ScoreResult:
        if isinstance(msg, Undecodable):
            raise InvalidRequest("request", f"not a valid ScoreRequest ({msg.reason}; strings must be UTF-8)")
        size = msg.ByteSize()
        if size > self._config.max_receive_message_bytes:
            raise InvalidRequest(
                "request", f"message is {size} bytes, over the limit of {self._config.max_receive_message_bytes}"
            )
        return await self._engine.score(request_from_proto(msg, deadline))

    @staticmethod
    def _gone(deadline: float | None) -> grpc.StatusCode:
        # grpc cancels the handler when the call's deadline passes, which can come just before the engine's
        # own deadline check: count that as the deadline it is, not as a client cancelling.
        late = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED

    def _replica(self) -> tuple[tuple[str, str], ...]:
        return ((REPLICA_HEADER, self.replica_id),)

    def _observe(self, method: str, code: grpc.StatusCode, started: float, result: ScoreResult | None) -> None:
        if self._metrics is not None:
            self._metrics.observe_request(method, code.name, time.perf_counter() - started, result)

    # -- RPCs -----------------------------------------------------------------------------------

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        deadline = self._deadline(context)
        try:
            result = await self._score(request, deadline)
        except asyncio.CancelledError:  # the client went away: the engine already dropped the work
            self._observe("Score", self._gone(deadline), started, None)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes exactly one status
            status = to_status(exc)
            self._observe("Score", status.code, started, None)
            # an error names its replica in the trailers: initial metadata would make it a committed response,
            # and gRPC clients never retry those (a draining replica's UNAVAILABLE must stay retryable)
            await context.abort(status.code, status.message, trailing_metadata=status.trailing_metadata() + self._replica())
        self._observe("Score", grpc.StatusCode.OK, started, result)
        # sent with the answer, not on arrival: a call whose replica dies before it answers has received
        # nothing yet, so the client's retry policy may still send it to another replica
        await context.send_initial_metadata(self._replica())
        return result_to_proto(result)

    async def ScoreStream(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # accept the stream at once: clients wait for this before their second write (see AsyncClient)
        await context.send_initial_metadata(self._replica())
        answers: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        seen: set[str] = set()
        stream_deadline = self._deadline(context)

        async def one(msg: Any) -> None:
            started = time.perf_counter()
            request_id = "" if isinstance(msg, Undecodable) else msg.request_id
            try:
                if isinstance(msg, Undecodable):
                    await self._score(msg, None)  # raises INVALID_ARGUMENT for this message
                if not msg.request_id:
                    raise InvalidRequest("request_id", "is required on a stream (responses come back out of order)")
                if msg.request_id in seen:
                    raise InvalidRequest("request_id", f"{msg.request_id!r} is already in flight on this stream")
                seen.add(msg.request_id)
                try:
                    result = await self._score(msg, stream_deadline)
                finally:
                    seen.discard(msg.request_id)
                self._observe("ScoreStream", grpc.StatusCode.OK, started, result)
                await answers.put(pb.ScoreStreamResponse(request_id=msg.request_id, response=result_to_proto(result)))
            except asyncio.CancelledError:
                self._observe("ScoreStream", self._gone(stream_deadline), started, None)
                raise
            except Exception as exc:  # noqa: BLE001 - reported in the stream; the stream goes on
                status = to_status(exc)
                self._observe("ScoreStream", status.code, started, None)
                error = pb.Error(
                    code=status.code.value[0], message=status.message, field=status.field, error_id=status.error_id
                )
                await answers.put(pb.ScoreStreamResponse(request_id=request_id, error=error))

        async def read() -> None:
            async for msg in request_iterator:
                task = asyncio.create_task(one(msg))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.wait(set(pending))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await answers.get()
                if item is None:
                    break
                yield item
            await reader
        finally:
            # the client cancelled or the stream failed: drop all of its queued work
            reader.cancel()
            for task in list(pending):
                task.cancel()

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
            replica_id=self.replica_id,
        )
