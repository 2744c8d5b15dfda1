"""The server's one configuration object, validated at start-up."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from stepscore.errors import ConfigError
from stepscore.runtime.allocator import CHOICES as ALLOCATORS

MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 50051
    max_receive_message_bytes: int = 16 * MiB
    max_send_message_bytes: int = 16 * MiB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # set: clients must present a certificate signed by it (mTLS)
    token: str | None = None  # set: every call but health needs "authorization: Bearer <token>"
    metrics_port: int = 0  # 0: no Prometheus endpoint
    metrics_host: str = "127.0.0.1"  # metrics say much about the load and nothing needs a token: loopback by default
    reflection: bool = False
    grace_seconds: float = 30.0  # in-flight calls get this long to finish on SIGTERM
    # ScoreStream flow control (stepscore.runtime.service.streams): requests one stream may have in flight
    # (queued, running, or answered and not yet read by the client); at the limit the stream is not read, so
    # HTTP/2 flow control holds the client. A stream also never holds more than its share of the queue.
    max_stream_inflight: int = 64
    # a stream whose client reads no answer for this long is closed with RESOURCE_EXHAUSTED, its work dropped
    stream_stall_seconds: float = 30.0
    replica_id: str = ""  # this replica's name in responses (metadata `stepscore-replica`, Info); "": host:port
    # the server process's malloc (stepscore.runtime.allocator): auto is jemalloc where it is installed, else
    # glibc tuned; on glibc's defaults RSS crept up in soaks (docs/reliability.md, "The allocator")
    allocator: str = "auto"

    def check(self) -> ServerConfig:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ConfigError("ports must be in 0..65535")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(f"metrics port {self.metrics_port} is the gRPC port")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{name} must be at least 1024 bytes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("mTLS (--client-ca) needs TLS: pass --tls-cert and --tls-key too")
        for path in (self.tls_cert, self.tls_key, self.client_ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("the bearer token must be at least 8 characters")
        if self.grace_seconds < 0:
            raise ConfigError("grace_seconds must be >= 0")
        if self.max_stream_inflight < 1:
            raise ConfigError(f"max_stream_inflight must be at least 1, got {self.max_stream_inflight}")
        if not self.stream_stall_seconds > 0:
            raise ConfigError(f"stream_stall_seconds must be positive, got {self.stream_stall_seconds}")
        if self.metrics_port and not self.metrics_host:
            raise ConfigError("metrics need an address to bind (--metrics-host)")
        # it travels as a gRPC metadata value: printable ASCII only, and short
        if len(self.replica_id) > 128 or not all(" " <= ch <= "~" for ch in self.replica_id):
            raise ConfigError("the replica id must be at most 128 printable ASCII characters (it is sent as metadata)")
        if self.allocator not in ALLOCATORS:
            raise ConfigError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {self.allocator!r}")
        return self


def default_replica_id(host: str, port: int) -> str:
    """host:port, what the replica is reached at; the machine's name for a wildcard host (0.0.0.0, ::), which
    every replica shares."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"
