"""`stepscore serve [BUNDLE]`: every flag also reads STEPSCORE_<FLAG> from the environment."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from stepscore.runtime import allocator
from stepscore.runtime.flags import (
    add_bundle_arg,
    add_engine_args,
    add_flag,
    add_switch,
    bundle_path,
    engine_config,
    engine_devices,
)
from stepscore.runtime.service.config import ServerConfig

SWITCH_INTERVAL_S = 0.0005  # see run_serve


def _path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def add_parser(sub: Any) -> None:
    d = ServerConfig()
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve a bundle over gRPC (default: the embedded model)",
        description="Serve step scores over gRPC (stepscore.v1.StepScorer), with grpc.health.v1 health, optional "
        "reflection, bearer-token auth, TLS/mTLS and Prometheus metrics. SIGTERM drains gracefully. "
        "Every flag can be given as an environment variable STEPSCORE_<FLAG>, e.g. STEPSCORE_PORT=50051.",
    )
    add_bundle_arg(p)
    g = p.add_argument_group("server")
    add_flag(g, "--host", d.host, str, "bind address")
    add_flag(g, "--port", d.port, int, "0 picks a free port")
    add_flag(g, "--max-receive-message-bytes", d.max_receive_message_bytes, int, "largest request accepted")
    add_flag(g, "--max-send-message-bytes", d.max_send_message_bytes, int, "largest response sent")
    add_flag(g, "--tls-cert", "", str, "PEM certificate (enables TLS)")
    add_flag(g, "--tls-key", "", str, "PEM private key")
    add_flag(g, "--client-ca", "", str, "PEM CA: clients must present a certificate it signed (mTLS)")
    add_flag(g, "--token", "", str, "require 'authorization: Bearer TOKEN' on every call but health (prefer the env variable)")
    add_flag(g, "--metrics-port", 0, int, "serve Prometheus metrics on this port", shown="off")
    add_flag(g, "--metrics-host", d.metrics_host, str, "address the metrics port binds (0.0.0.0 for a remote scraper)")
    add_switch(g, "--reflection", "enable gRPC server reflection (for grpcurl)")
    add_flag(
        g,
        "--replica-id",
        "",
        str,
        "this replica's name, returned in every response's `stepscore-replica` metadata and in Info",
        shown="host:port (the machine's name for a wildcard host)",
    )
    add_flag(g, "--grace-seconds", d.grace_seconds, float, "how long in-flight calls may take to finish on SIGTERM")
    add_flag(
        g,
        "--log-level",
        "info",
        str,
        "logging level (info: one line at start-up and one at shutdown)",
        choices=("debug", "info", "warning", "error"),
    )
    add_flag(
        g,
        "--max-stream-inflight",
        d.max_stream_inflight,
        int,
        "requests one ScoreStream may have in flight (queued, running or answered and unread); at the limit the "
        "stream is not read until answers are consumed",
    )
    add_flag(
        g,
        "--stream-stall-seconds",
        d.stream_stall_seconds,
        float,
        "a stream whose client reads no answer for this long is closed (RESOURCE_EXHAUSTED) and its work dropped",
    )
    add_flag(
        g,
        "--allocator",
        d.allocator,
        str,
        "the server process's malloc: auto is jemalloc where it is installed (the server re-executes itself once "
        "with it preloaded), else glibc with a fixed mmap threshold; jemalloc refuses to start without it",
        choices=allocator.CHOICES,
    )
    add_engine_args(p)
    p.set_defaults(run=run_serve)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_receive_message_bytes=args.max_receive_message_bytes,
        max_send_message_bytes=args.max_send_message_bytes,
        tls_cert=_path(args.tls_cert),
        tls_key=_path(args.tls_key),
        client_ca=_path(args.client_ca),
        token=args.token or None,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        reflection=args.reflection,
        grace_seconds=args.grace_seconds,
        max_stream_inflight=args.max_stream_inflight,
        stream_stall_seconds=args.stream_stall_seconds,
        replica_id=args.replica_id,
        allocator=args.allocator,
    ).check()


def run_serve(args: argparse.Namespace) -> int:
    from stepscore.runtime.engine import Engine
    from stepscore.runtime.service.server import Server

    config = server_config(args)  # refuse bad settings before loading anything
    # The event loop answers every call (refusals included) but shares the GIL with the packing and tokenizer
    # threads; with Python's default switch interval (5 ms) a call waits up to that for each of its few turns.
    # This process is the server's own, so it may set it (refusals under overload: docs/reliability.md; the
    # figures once quoted here came from a storm whose load the prefix cache answered without the model).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # first, before a thread starts or a file opens: it may re-execute this process with jemalloc preloaded
    malloc = allocator.settle(config.allocator, own_process=getattr(args, "own_process", False))

    async def main() -> None:
        engine = Engine.from_bundle(bundle_path(args.bundle), args.device, engine_config(args), engine_devices(args))
        server = Server(engine, config)

        def ready(s: Server) -> None:
            print(f"stepscore serve: ready on {config.host}:{s.port}", flush=True)

        await server.run_until_signalled(ready, process=malloc)

    asyncio.run(main())
    print("stepscore serve: stopped", file=sys.stderr, flush=True)
    return 0
