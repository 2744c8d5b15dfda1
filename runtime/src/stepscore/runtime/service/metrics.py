"""Prometheus metrics: requests by status code, latency / queue / compute histograms, batch shape,
padding fraction, runs by graph (tree or plain rows) and queue depth. Served on their own port when --metrics-port is set."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stepscore.runtime.packing import PackedBatch
from stepscore.runtime.types import ScoreResult

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stepscore_requests", "Scoring requests by RPC and status code", ["method", "code"], registry=r)
        self.latency = Histogram(
            "stepscore_request_seconds", "Time in the server per request", ["method"], buckets=_LATENCY, registry=r
        )
        self.queue = Histogram("stepscore_queue_seconds", "Time waiting for a batch", buckets=_LATENCY, registry=r)
        self.compute = Histogram("stepscore_compute_seconds", "Model time per request", buckets=_LATENCY, registry=r)
        self.batch_tokens = Histogram(
            "stepscore_batch_tokens",
            "Tokens computed per engine run (padding included)",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
            registry=r,
        )
        self.batch_rows = Histogram(
            "stepscore_batch_rows", "Rows per engine run", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_padding = Histogram(
            "stepscore_batch_padding_fraction",
            "Fraction of computed tokens that were padding",
            buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.tokens = Counter(
            "stepscore_tokens",
            "Tokens by kind: submitted (candidates), used (after prefix sharing), computed (padding included)",
            ["kind"],
            registry=r,
        )
        self.batches = Counter(
            "stepscore_batches",
            "Engine runs by graph: tree (packed rows, shared prefixes) or plain (one padded row per candidate)",
            ["graph"],
            registry=r,
        )
        self.queue_depth = Gauge("stepscore_queue_depth", "Requests admitted and not finished", registry=r)
        self.queued_tokens = Gauge("stepscore_queued_tokens", "Tokens of requests admitted and not finished", registry=r)

    def bind(self, depth: Callable[[], float], tokens: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.queued_tokens.set_function(tokens)

    def observe_batch(self, batch: PackedBatch, seconds: float) -> None:
        self.batches.labels("tree" if batch.seq_lens is None else "plain").inc()
        self.batch_tokens.observe(batch.tokens_computed)
        self.batch_rows.observe(batch.shape[0])
        self.batch_padding.observe(batch.padding_fraction)
        self.tokens.labels("submitted").inc(batch.tokens_submitted)
        self.tokens.labels("used").inc(batch.tokens_used)
        self.tokens.labels("computed").inc(batch.tokens_computed)

    def observe_request(self, method: str, code: str, seconds: float, result: ScoreResult | None) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)
        if result is not None:
            self.queue.observe(result.timing.queue_ms / 1000.0)
            self.compute.observe(result.timing.compute_ms / 1000.0)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
