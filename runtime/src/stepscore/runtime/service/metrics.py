"""Prometheus metrics: every call by method and final status (stepscore.runtime.service.calls), scoring
requests by status code, latency / queue / compute histograms, batch shape, padding fraction, runs by graph
(tree or plain rows) and queue depth. Served on their own address (--metrics-host, --metrics-port), bound
before the gRPC port opens so that a taken port fails start-up with nothing served."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stepscore.runtime.packing import PackedBatch
from stepscore.runtime.prefixcache import PrefixCache
from stepscore.runtime.types import ScoreResult

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# refusals take well under a millisecond: the call histogram resolves them
_CALL_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, *_LATENCY[3:])


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on stderr helps nobody


def _http_server(host: str, port: int, app: Any) -> WSGIServer:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Threaded(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    server: WSGIServer = make_server(host, port, app, Threaded, handler_class=_QuietHandler)
    return server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "stepscore_calls",
            "Every RPC by full method name and final status code, including calls refused before a servicer ran "
            "(authentication, a deadline passed while the message arrived, a message over the size limit)",
            ["method", "code"],
            registry=r,
        )
        self.call_latency = Histogram(
            "stepscore_call_seconds",
            "Time from a call's arrival at the servicer's interceptors to its status, by method and status code",
            ["method", "code"],
            buckets=_CALL_LATENCY,
            registry=r,
        )
        self.requests = Counter(
            "stepscore_requests",
            "Scoring requests that reached the servicer (one per Score call, one per ScoreStream message) by status code",
            ["method", "code"],
            registry=r,
        )
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
            "Engine runs by graph: tree (packed rows, shared prefixes), plain (one padded row per candidate) or cached "
            "(suffixes continuing the prefix cache)",
            ["graph"],
            registry=r,
        )
        self.queue_depth = Gauge("stepscore_queue_depth", "Requests admitted and not finished", registry=r)
        self.queued_tokens = Gauge("stepscore_queued_tokens", "Tokens of requests admitted and not finished", registry=r)

        self.text_cache = Gauge(
            "stepscore_text_cache_bytes", "Memory the tokenization cache holds (bounded by --text-cache-mb)", registry=r
        )
        self.stream_stalls = Counter(
            "stepscore_stream_stalls",
            "Streams closed with RESOURCE_EXHAUSTED because their client read no answer for --stream-stall-seconds",
            registry=r,
        )

    def bind(self, depth: Callable[[], float], tokens: Callable[[], float], cache: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.queued_tokens.set_function(tokens)
        self.text_cache.set_function(cache)

    def bind_prefix_cache(self, cache: PrefixCache) -> None:
        """Export the prefix cache's counters, read at each scrape (the cache owns them)."""
        self.registry.register(_PrefixCacheCollector(cache))

    def observe_batch(self, batch: PackedBatch, seconds: float) -> None:
        self.batches.labels("cached" if batch.past_len is not None else "tree" if batch.seq_lens is None else "plain").inc()
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

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method, code).inc()
        self.call_latency.labels(method, code).observe(seconds)

    _http: WSGIServer | None = None
    _serving = False

    def listen(self, host: str, port: int) -> None:
        """Bind the metrics port now (raises OSError when it is taken); `start_serving` serves it."""
        self._http = _http_server(host, port, make_wsgi_app(self.registry))

    def start_serving(self) -> None:
        if self._http is not None and not self._serving:
            self._serving = True
            threading.Thread(target=self._http.serve_forever, name="stepscore-metrics", daemon=True).start()

    def close(self) -> None:
        """Release the port (whether or not it was served)."""
        if self._http is not None:
            http, self._http = self._http, None
            if self._serving:
                http.shutdown()
            http.server_close()


class _PrefixCacheCollector(Collector):
    def __init__(self, cache: PrefixCache) -> None:
        self._cache = cache

    def collect(self) -> Any:
        s = self._cache.stats
        tokens = CounterMetricFamily(
            "stepscore_prefix_cache_tokens",
            "Candidate tokens by where they came from: hit (the prefix cache) or miss (computed)",
            labels=["kind"],
        )
        tokens.add_metric(["hit"], s.hit_tokens)
        tokens.add_metric(["miss"], s.miss_tokens)
        yield tokens
        yield GaugeMetricFamily("stepscore_prefix_cache_bytes", "K/V bytes the prefix cache holds", value=s.bytes)
        yield GaugeMetricFamily(
            "stepscore_prefix_cache_budget_bytes",
            "Memory the prefix cache may hold (--cache-mb)",
            value=self._cache.budget_bytes,
        )
        yield GaugeMetricFamily("stepscore_prefix_cache_entries", "Cached step segments", value=s.entries)
        yield CounterMetricFamily(
            "stepscore_prefix_cache_evictions", "Segments evicted to make room (least recently used first)", value=s.evictions
        )
        yield CounterMetricFamily(
            "stepscore_prefix_cache_end_search_frees", "Segments freed by EndSearch", value=s.freed_by_end_search
        )
