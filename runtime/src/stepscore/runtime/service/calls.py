"""Every RPC counted by its final status, as a server interceptor (the outermost one).

A servicer sees only the calls that reach it. This interceptor also sees those refused before: a missing or
wrong token (UNAUTHENTICATED, decided by the auth interceptor inside it), a deadline that passed while the
request message was still arriving, a message over the size limit (gRPC answers RESOURCE_EXHAUSTED), a method
that does not exist. To see the second and third, handlers whose request is a single message are served in
their streaming form: the wrapper runs as soon as the call arrives and reads the message itself, so the
count starts with the call, not with the arrival of its message.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Observe = Callable[[str, str, float], None]  # (method, status code name, seconds)

# A call that ends this close to its deadline ended because of it. The server's deadline is the client's plus
# the time the call's headers took to arrive, so the cancellation a client sends when its own deadline passes
# can reach the server before the server's deadline does, by up to that delay: hundreds of milliseconds on a
# loaded machine (an exact check miscounted one call in 5 full test runs with both cores busy).
DEADLINE_SLACK_S = 0.5


def deadline_passed(remaining: float | None) -> bool:
    """Whether a call with `remaining` seconds left (None: no deadline) counts as past its deadline."""
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def _code(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


def _gone(context: grpc.aio.ServicerContext) -> str:
    # gRPC cancels the handler both when the client leaves and when the deadline passes
    return "DEADLINE_EXCEEDED" if deadline_passed(context.time_remaining()) else "CANCELLED"


async def _first(context: grpc.aio.ServicerContext) -> Any:
    """The one request message of a unary-request call; ends the call when it never came."""
    request = await context.read()
    if request is grpc.aio.EOF:
        # gRPC already answered when the message was over the limit; otherwise the client sent none
        if deadline_passed(context.time_remaining()):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request arrived")
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "no request message arrived (over the size limit, or none was sent)"
        )
    return request


def _wrap(handler: Any, done: Callable[[str], None]) -> Any:
    """`handler` in streaming-request form, reporting its final status code to `done` exactly once."""
    unary_request = not handler.request_streaming
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}

    async def argument(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _first(context) if unary_request else request

    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            code = "UNKNOWN"
            try:
                async for item in inner(await argument(request, context), context):
                    yield item
                code = _code(context, "OK")
            except (asyncio.CancelledError, GeneratorExit):
                code = _gone(context)
                raise
            except Exception:
                code = _code(context, "UNKNOWN")
                raise
            finally:
                done(code)

        return grpc.stream_stream_rpc_method_handler(stream, **kw)

    if not inspect.iscoroutinefunction(inner):
        return handler  # a synchronous handler (stepscore registers none): left as it is

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        code = "UNKNOWN"
        try:
            result = await inner(await argument(request, context), context)
            code = _code(context, "OK")
            return result
        except asyncio.CancelledError:
            code = _gone(context)
            raise
        except Exception:  # AbortError included: the code is the one abort set
            code = _code(context, "UNKNOWN")
            raise
        finally:
            done(code)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(call, **kw)
    return grpc.stream_unary_rpc_method_handler(call, **kw)


class CallMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Reports (method, code, seconds) for every call; unknown methods are reported as method "unknown"."""

    def __init__(self, observe: Observe) -> None:
        self._observe = observe

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails) -> Any:
        started = time.perf_counter()
        handler = await continuation(details)
        if handler is None:  # gRPC answers UNIMPLEMENTED; the name is the client's, so it is not a label
            self._observe("unknown", "UNIMPLEMENTED", time.perf_counter() - started)
            return None
        method = str(details.method)
        return _wrap(handler, lambda code: self._observe(method, code, time.perf_counter() - started))
