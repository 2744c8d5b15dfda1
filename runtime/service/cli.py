"""`stepscore serve [BUNDLE]`: every flag also reads STEPSCORE_<FLAG> from the environment."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from stepscore.runtime.cli import add_engine_args, bundle_path, engine_config, engine_devices, env_default, env_flag
from stepscore.runtime.service.config import ServerConfig


def _path(raw: str) -> Path | None:
    return Path(raw) if raw else None


def add_parsers(sub: Any) -> None:
    d = ServerConfig()
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve a bundle over gRPC (default: the embedded model)",
        description="Serve step scores over gRPC (stepscore.v1.StepScorer), with grpc.health.v1 health, optional "
        "reflection, bearer-token auth, TLS/mTLS and Prometheus metrics. SIGTERM drains gracefully. "
        "Every flag can be given as an environment variable STEPSCORE_<FLAG>, e.g. STEPSCORE_PORT=50051.",
    )
    p.add_argument(
        "bundle",
        nargs="?",
        default=env_default("bundle", None, str),
        help="bundle directory (default: the embedded default model)",
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default=env_default("host", d.host, str), help=f"bind address (default {d.host})")
    g.add_argument("--port", type=int, default=env_default("port", d.port, int), help=f"0 picks a free port (default {d.port})")
    g.add_argument(
        "--max-receive-message-bytes",
        type=int,
        default=env_default("max-receive-message-bytes", d.max_receive_message_bytes, int),
        help=f"largest request accepted (default {d.max_receive_message_bytes})",
    )
    g.add_argument(
        "--max-send-message-bytes",
        type=int,
        default=env_default("max-send-message-bytes", d.max_send_message_bytes, int),
        help=f"largest response sent (default {d.max_send_message_bytes})",
    )
    g.add_argument("--tls-cert", default=env_default("tls-cert", "", str), help="PEM certificate (enables TLS)")
    g.add_argument("--tls-key", default=env_default("tls-key", "", str), help="PEM private key")
    g.add_argument(
        "--client-ca",
        default=env_default("client-ca", "", str),
        help="PEM CA: clients must present a certificate it signed (mTLS)",
    )
    g.add_argument(
        "--token",
        default=env_default("token", "", str),
        help="require 'authorization: Bearer TOKEN' on every call but health (prefer STEPSCORE_TOKEN)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=env_default("metrics-port", 0, int),
        help="serve Prometheus metrics on this port (default: off)",
    )
    g.add_argument(
        "--reflection",
        action="store_true",
        default=env_default("reflection", False, env_flag),
        help="enable gRPC server reflection (for grpcurl)",
    )
    g.add_argument(
        "--grace-seconds",
        type=float,
        default=env_default("grace-seconds", d.grace_seconds, float),
        help=f"how long in-flight calls may take to finish on SIGTERM (default {d.grace_seconds:g})",
    )
    g.add_argument(
        "--log-level", default=env_default("log-level", "warning", str), choices=("debug", "info", "warning", "error")
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
        reflection=args.reflection,
        grace_seconds=args.grace_seconds,
    ).check()


def run_serve(args: argparse.Namespace) -> int:
    from stepscore.runtime.engine import Engine
    from stepscore.runtime.service.server import Server

    config = server_config(args)  # refuse bad settings before loading anything

    async def main() -> None:
        engine = Engine.from_bundle(bundle_path(args.bundle), args.device, engine_config(args), engine_devices(args))
        server = Server(engine, config)

        def ready(s: Server) -> None:
            print(f"stepscore serve: ready on {config.host}:{s.port}", flush=True)

        await server.run_until_signalled(ready)

    asyncio.run(main())
    print("stepscore serve: stopped", file=sys.stderr, flush=True)
    return 0
