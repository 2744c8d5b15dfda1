"""The server's one configuration object, validated at start-up."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from stepscore.errors import ConfigError

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
    reflection: bool = False
    grace_seconds: float = 30.0  # in-flight calls get this long to finish on SIGTERM
    replica_id: str = ""  # this replica's name in responses (metadata `stepscore-replica`, Info); "": host:port

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
        # it travels as a gRPC metadata value: printable ASCII only, and short
        if len(self.replica_id) > 128 or not all(" " <= ch <= "~" for ch in self.replica_id):
            raise ConfigError("the replica id must be at most 128 printable ASCII characters (it is sent as metadata)")
        return self


def default_replica_id(host: str, port: int) -> str:
    """host:port, what the replica is reached at; the machine's name for a wildcard host (0.0.0.0, ::), which
    every replica shares."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"
