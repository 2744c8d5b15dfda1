"""Python client for `stepscore serve`, sync and asyncio.

    from stepscore.runtime.client import Client
    with Client("127.0.0.1:50051") as client:
        result = client.score("What is 2+2?", [["2+2=4.", "The answer is 4."]], aggregates=["min"])
        print(result.candidates[0].step_scores)

    async with AsyncClient("127.0.0.1:50051") as client:
        async for item in client.score_stream(requests):   # answers as they finish, any order
            print(item.request_id, item.result or item.error)

Scale out: a target may name several replicas, `ipv4:127.0.0.1:5001,127.0.0.1:5002` (or `ipv6:...`), or a
`dns:///name:port` that resolves to several (a Kubernetes headless Service). The client then balances on its
own with gRPC's `ring_hash` policy keyed on the `x-stepscore-search-id` header, which it sends for every
request with a `search_id`: every call of one search reaches one replica (the one holding its prefixes), and a
replica's loss moves only its own searches. Calls without a search id carry no header; ring_hash then picks a
random replica per call (measured on grpcio 1.85), so they spread. A call refused UNAVAILABLE (its replica died
or is draining) is retried by gRPC's retry policy, on the next replica of the ring; the client also watches each
replica's health, so a draining one (NOT_SERVING) leaves the ring before it refuses anything. `ScoreResult.replica` names
the replica that answered (its `stepscore-replica` response metadata). A target naming one server keeps gRPC's
default policy, pick_first, and no retries unless `retry=True` (behind a proxy such as deploy/nginx/nginx.conf,
which cannot replay a call its replica dropped, but answers UNAVAILABLE: the client's retry then goes through the
proxy to another replica). `retry=False` turns retries off for several servers too. `balancing="round_robin"`
spreads several replicas' calls in turn, search ids ignored (what a plain balancer does; `stepscore bench
--target A,B,C` compares it with ring_hash).

grpcio reads a ring_hash config's `requestHashHeader` only when `GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY`
is true (without it every call fails INTERNAL "hash attribute not present"): importing this module sets it
(unless the environment already sets it) before any channel of ours exists; grpc reads it when a channel
parses its service config, so a process that imported grpc earlier is fine too.

Errors come back as the same `stepscore.errors` types the engine raises (InvalidRequest with its `field`,
Overloaded, DeadlineExceeded, InternalError with its `error_id`, ...), through the one status table
(`stepscore.runtime.service.status`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

# before gRPC parses any service config of ours (see the module docstring); setdefault keeps a user's choice
os.environ.setdefault("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")

import grpc  # after the variable above

from stepscore.errors import StepscoreError, Unavailable
from stepscore.runtime.service.convert import REPLICA_HEADER, SEARCH_ID_HEADER, request_to_proto, result_from_proto
from stepscore.runtime.service.status import code_from_number, from_rpc_error, from_status
from stepscore.runtime.types import ScoreRequest, ScoreResult, TokenIds
from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc

RETRY_ATTEMPTS = 5  # per call, the first included: a dead replica costs a retry on the next one, not an error


def names_several(target: str) -> bool:
    """Whether a target may resolve to several servers: an address list or a DNS name (a headless Service)."""
    scheme, _, rest = target.partition(":")
    return (scheme in ("ipv4", "ipv6") and "," in rest) or scheme == "dns"


BALANCING = ("ring_hash", "round_robin")


def _check_balancing(balancing: str) -> None:
    if balancing not in BALANCING:
        raise ValueError(f"balancing must be one of {', '.join(BALANCING)}, got {balancing!r}")


def service_config(
    several: bool = True, retry: bool = True, attempts: int = RETRY_ATTEMPTS, balancing: str = "ring_hash"
) -> str:
    """gRPC service config (JSON): for `several` replicas, the `balancing` policy with health checking:
    ring_hash on the search-id header, or round_robin; with `retry`, retries on UNAVAILABLE (a replica that
    died), which the policy sends to the next replica."""
    _check_balancing(balancing)
    config: dict[str, Any] = {}
    if retry:
        config["methodConfig"] = [
            {
                "name": [{"service": pb.DESCRIPTOR.services_by_name["StepScorer"].full_name}],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if several:
        policy = (
            {"round_robin": {}}
            if balancing == "round_robin"
            else {"ring_hash_experimental": {"requestHashHeader": SEARCH_ID_HEADER}}
        )
        config["loadBalancingConfig"] = [policy]
        # watch each replica's grpc.health.v1 status: one that starts draining (NOT_SERVING) leaves the ring at
        # once, so its searches move on while it finishes its in-flight calls (retries alone would keep hashing
        # to it and get UNAVAILABLE until it exits)
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def _replica(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REPLICA_HEADER:
            return str(value)
    return ""


@dataclass(frozen=True)
class StreamItem:
    """One answer from `score_stream`: a result or the error of that request."""

    request_id: str
    result: ScoreResult | None = None
    error: StepscoreError | None = None


def _request(
    problem: str | ScoreRequest, candidates: Sequence[Sequence[str] | TokenIds] | None, options: dict[str, Any]
) -> ScoreRequest:
    if isinstance(problem, ScoreRequest):
        return problem
    if "aggregates" in options:
        options["aggregates"] = tuple(options["aggregates"])
    return ScoreRequest(problem, list(candidates or []), **options)


def _channel(
    api: Any,
    target: str,
    tls: bool,
    root_ca: Path | None,
    cert: Path | None,
    key: Path | None,
    max_bytes: int,
    retry: bool | None = None,
    balancing: str = "ring_hash",
) -> Any:
    """A channel from `grpc` or `grpc.aio` (same arguments): TLS when asked or when certificates are given;
    ring_hash and retries for several replicas, retries alone for one address when `retry` (a proxy in front of
    replicas, such as deploy/nginx/nginx.conf, answers UNAVAILABLE for a call whose replica died)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]
    several = names_several(target)
    retry = several if retry is None else retry
    if several or retry:
        options.append(("grpc.service_config", service_config(several=several, retry=retry, balancing=balancing)))
    if tls or root_ca or cert:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root_ca.read_bytes() if root_ca else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        return api.secure_channel(target, creds, options=options)
    return api.insecure_channel(target, options=options)


def _stub(channel: Any) -> Any:
    stub_cls: Any = pb_grpc.StepScorerStub  # generated code, untyped
    return stub_cls(channel)


class _Base:
    """What both clients share: the channel (plain, TLS or mTLS), the stub, credentials and timeout.
    `_api` is `grpc` for the blocking client and `grpc.aio` for the asyncio one (same channel arguments)."""

    _api: Any = grpc

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool = False,
        root_ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 64 << 20,
        retry: bool | None = None,
        balancing: str = "ring_hash",
    ) -> None:
        _check_balancing(balancing)  # here, not at the first call (one address builds no service config)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._timeout = timeout
        self._channel = _channel(self._api, target, tls, root_ca, cert, key, max_message_bytes, retry, balancing)
        self._stub = _stub(self._channel)

    def _call_metadata(self, search_id: str) -> tuple[tuple[str, str], ...] | None:
        """The call's metadata: the token, and the search id that ring_hash routes by."""
        pairs = (*(self._metadata or ()), *(((SEARCH_ID_HEADER, search_id),) if search_id else ()))
        return pairs or None


class Client(_Base):
    """Blocking client. `tls=True` (or `root_ca=...`) for TLS; `cert`/`key` for mTLS."""

    def score(
        self,
        problem: str | ScoreRequest,
        candidates: Sequence[Sequence[str] | TokenIds] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ScoreResult:
        request = _request(problem, candidates, options)
        try:
            reply, call = self._stub.Score.with_call(
                request_to_proto(request), timeout=timeout or self._timeout, metadata=self._call_metadata(request.search_id)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return result_from_proto(reply, _replica(call.initial_metadata()))

    def end_search(self, search_id: str, timeout: float | None = None) -> int:
        """The search is finished: the server frees the prefix-cache entries only it used. Returns the bytes
        freed. Sent with the search id header, so it reaches the replica the search's calls reached."""
        try:
            reply = self._stub.EndSearch(
                pb.EndSearchRequest(search_id=search_id),
                timeout=timeout or self._timeout,
                metadata=self._call_metadata(search_id),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return int(reply.freed_bytes)

    def info(self) -> dict[str, Any]:
        try:
            reply = self._stub.Info(pb.InfoRequest(), timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        out = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
        out["devices"], out["aggregates"] = list(reply.devices), list(reply.aggregates)
        out["manifest"] = json.loads(out.pop("manifest_json") or "{}")
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health check says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"server not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _lost_status(err: grpc.RpcError) -> bool:
    """grpcio's own INTERNAL for a write that raced the end of a stream (the server's status is lost)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else ""
    return code == grpc.StatusCode.INTERNAL and "Internal error from Core" in (details or "")


class AsyncClient(_Base):
    """asyncio client; `score_stream` is an async iterator over answers in completion order."""

    _api = grpc.aio

    async def score(
        self,
        problem: str | ScoreRequest,
        candidates: Sequence[Sequence[str] | TokenIds] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> ScoreResult:
        request = _request(problem, candidates, options)
        try:
            call = self._stub.Score(
                request_to_proto(request), timeout=timeout or self._timeout, metadata=self._call_metadata(request.search_id)
            )
            reply = await call
            replica = _replica(await call.initial_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return result_from_proto(reply, replica)

    async def end_search(self, search_id: str, timeout: float | None = None) -> int:
        """As Client.end_search."""
        try:
            reply = await self._stub.EndSearch(
                pb.EndSearchRequest(search_id=search_id),
                timeout=timeout or self._timeout,
                metadata=self._call_metadata(search_id),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return int(reply.freed_bytes)

    async def score_stream(
        self, requests: AsyncIterable[ScoreRequest] | Sequence[ScoreRequest], search_id: str = ""
    ) -> AsyncIterator[StreamItem]:
        """Send requests on one stream; yield each answer as soon as the server sends it.

        A stream is one call, routed once: `search_id` (not the requests' own) picks its replica."""

        async def produce() -> AsyncIterator[Any]:
            if isinstance(requests, Sequence):
                for r in requests:
                    yield request_to_proto(r)
            else:
                async for r in requests:
                    yield request_to_proto(r)

        call = self._stub.ScoreStream(produce(), timeout=self._timeout, metadata=self._call_metadata(search_id))
        answered = False
        replica: str | None = None
        try:
            async for msg in call:
                answered = True
                if replica is None:
                    replica = _replica(await call.initial_metadata())
                if msg.WhichOneof("result") == "response":
                    yield StreamItem(msg.request_id, result=result_from_proto(msg.response, replica))
                else:
                    code = code_from_number(msg.error.code)
                    error = from_status(code, msg.error.message, msg.error.field, msg.error.error_id)
                    yield StreamItem(msg.request_id, error=error)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if not answered and _lost_status(err):
                error = await self._why_refused(error)
            raise error from None
        finally:
            call.cancel()

    async def _why_refused(self, fallback: StepscoreError) -> StepscoreError:
        """The real reason a stream was refused at once. grpcio's asyncio client reports INTERNAL "Internal
        error from Core" instead of the server's status when one of its writes races the end of the call
        (grpc/grpc#36066); a unary call with the same credentials meets the same refusal (a bad token, a
        draining server) and reports it faithfully. If that call succeeds, the stream's error stands."""
        try:
            await self._stub.Info(pb.InfoRequest(), timeout=self._timeout or 10.0, metadata=self._metadata)
        except grpc.RpcError as err:
            return from_rpc_error(err)
        return fallback

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


__all__ = ["SEARCH_ID_HEADER", "AsyncClient", "Client", "StreamItem", "names_several", "service_config"]
