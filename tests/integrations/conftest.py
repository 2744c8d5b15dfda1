"""One live `stepscore serve` of the embedded default model for the adapter tests, with its metrics port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from stepscore.runtime.default_model import default_bundle
from tests.helpers.server import ServerProcess, read_metric, serve


@dataclass(frozen=True)
class Live:
    server: ServerProcess
    metrics_port: int

    @property
    def target(self) -> str:
        return self.server.target

    def cache_hits(self) -> float:
        """Tokens the server's prefix cache has served so far (its /metrics)."""
        return read_metric(self.metrics_port, "stepscore_prefix_cache_tokens_total", kind="hit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="package")
def live() -> Iterator[Live]:
    port = _free_port()
    with serve(default_bundle(), "--metrics-port", str(port)) as server:
        yield Live(server, port)
