"""Run the service: gRPC server + health + (opt-in) reflection + auth + TLS + metrics, and a graceful
shutdown on SIGTERM / SIGINT:

1. health goes NOT_SERVING and the engine refuses new requests (UNAVAILABLE);
2. queued and in-flight requests finish, for up to the grace period;
3. the server stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stepscore.errors import ConfigError
from stepscore.runtime.engine import Engine
from stepscore.runtime.service.auth import BearerTokenInterceptor
from stepscore.runtime.service.calls import CallMetrics
from stepscore.runtime.service.config import ServerConfig, default_replica_id
from stepscore.runtime.service.metrics import Metrics
from stepscore.runtime.service.servicer import StepScorerServicer, register
from stepscore.v1 import stepscore_pb2 as pb

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StepScorer"].full_name


class Server:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config.check()
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        # outermost first: every call is counted, those the token check refuses too
        interceptors: list[Any] = [CallMetrics(self.metrics.observe_call)]
        if config.token:
            interceptors.append(BearerTokenInterceptor(config.token))
        # The advertised limit is gRPC's own: a larger message is refused (RESOURCE_EXHAUSTED) as its length
        # prefix arrives, before it is buffered or parsed.
        options = [
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        ]
        # Every port is bound before any is served: a taken one fails start-up with nothing open.
        if config.metrics_port:
            try:
                self.metrics.listen(config.metrics_host, config.metrics_port)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise ConfigError(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {reason}") from None
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        servicer = StepScorerServicer(engine, config, self.metrics)
        register(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server,
            )
        try:
            self.port = self._bind()
        except ConfigError:
            self.metrics.close()
            raise
        # named once the port is known: the default, host:port, is what the replica is reached at
        self.replica_id = config.replica_id or default_replica_id(config.host, self.port)
        servicer.replica_id = self.replica_id
        self._stopping: asyncio.Event | None = None

    def _bind(self) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert and cfg.tls_key:
                creds = grpc.ssl_server_credentials(
                    [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                    root_certificates=cfg.client_ca.read_bytes() if cfg.client_ca else None,
                    require_client_auth=cfg.client_ca is not None,
                )
                port = self.server.add_secure_port(address, creds)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: the port is taken or the address is not local") from exc
        if port == 0:
            raise ConfigError(f"cannot listen on {address}: the port is taken or the address is not local")
        return int(port)

    async def start(self) -> None:
        """Health says SERVING only at the end: the engine's sessions were warmed up when it was built (a
        first run of every graph), so a readiness probe or a load balancer never sends work to a cold replica."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        await self.engine.start()  # sessions were warmed up when the engine was built
        self.metrics.bind(
            lambda: self.engine.queue_depth, lambda: self.engine.queued_tokens, lambda: self.engine.formatter.cache_bytes
        )
        if self.engine.cache is not None:
            self.metrics.bind_prefix_cache(self.engine.cache)
        self.engine.on_batch(self.metrics.observe_batch)
        self.metrics.start_serving()  # bound in __init__, with the gRPC port
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self) -> None:
        """Drain: NOT_SERVING, refuse new work, let in-flight work finish within the grace period."""
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.begin_drain()
        deadline = time.monotonic() + self.config.grace_seconds
        while self.engine.queue_depth and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # a moment for the last responses to be written before the transport closes
        await self.server.stop(grace=min(2.0, max(0.0, deadline - time.monotonic())))
        await self.engine.close(drain_timeout=0)
        self.metrics.close()

    async def run_until_signalled(self, ready: Any = None, process: str = "") -> None:
        """Serve until SIGTERM or SIGINT, then drain. `process`: what the caller set up for the whole process
        (the allocator), for the start-up line."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        scheme = "grpcs" if self.config.tls_cert else "grpc"
        info = self.engine.info()
        metrics = f", metrics on :{self.config.metrics_port}" if self.config.metrics_port else ""
        log.info(
            "serving %s (%s, %s) on %s://%s:%d as replica %s, devices %s%s%s",
            info.model,
            info.preset,
            info.precision,
            scheme,
            self.config.host,
            self.port,
            self.replica_id,
            ",".join(info.devices),
            metrics,
            f"; {process}" if process else "",
        )
        if ready is not None:
            ready(self)
        await stop.wait()
        log.info("shutting down: draining for up to %.0fs", self.config.grace_seconds)
        await self.shutdown()
