"""Bearer-token authentication as a server interceptor. Health checks are exempt (load balancers and
orchestrators probe without credentials); every other method needs the token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        given = [value for key, value in (details.invocation_metadata or ()) if key == "authorization"]
        if len(given) > 1:  # which one would count is up to each proxy on the way: none does
            return _deny(handler, "more than one authorization header: send exactly one 'authorization: Bearer <token>'")
        token = given[0] if given else ""
        # constant-time comparison: the answer time says nothing about how much of the token matched
        if hmac.compare_digest(token.encode() if isinstance(token, str) else token, self._expected):
            return handler
        return _deny(handler, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


def _deny(handler: Any, message: str) -> Any:

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as the handler type requires

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)
