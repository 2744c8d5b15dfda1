"""The engine: a bundle, its formatter, one backend per device and the scheduler behind one `score()`.

    engine = Engine.from_bundle("bundle/", device="cpu")
    async with engine:
        result = await engine.score(ScoreRequest(problem, [[step, ...], ...], aggregates=("min",)))

`SyncEngine` wraps it for scripts and notebooks. Every accepted request gets exactly one outcome: a
result, or one of the errors in `stepscore.errors`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from stepscore.errors import ConfigError, DeadlineExceeded, InvalidRequest, Unavailable
from stepscore.runtime import costmodel, priority
from stepscore.runtime.aggregates import aggregate
from stepscore.runtime.backend import Backend, KvBackend, OrtBackend
from stepscore.runtime.bundle import Bundle, load_bundle
from stepscore.runtime.cachedbatch import Suffix
from stepscore.runtime.config import EngineConfig
from stepscore.runtime.core import Permit
from stepscore.runtime.formatting import Formatter
from stepscore.runtime.limits import WorkGuard
from stepscore.runtime.packing import PackedBatch
from stepscore.runtime.prefixcache import Match, PrefixCache
from stepscore.runtime.scheduler import Scheduler, SchedulerStats
from stepscore.runtime.types import AGGREGATES, CandidateScore, Formatted, ScoreRequest, ScoreResult, Timing, TokenIds
from stepscore.version import __version__

log = logging.getLogger(__name__)


def validate_request(request: ScoreRequest) -> None:
    """Structural checks done before any work; each error names the field."""
    if not isinstance(request.problem, str):
        raise InvalidRequest("problem", "must be a string")
    if not request.candidates:
        raise InvalidRequest("candidates", "at least one candidate is required")
    for i, cand in enumerate(request.candidates):
        if isinstance(cand, TokenIds):
            continue
        if isinstance(cand, str) or not isinstance(cand, Sequence):
            raise InvalidRequest(f"candidates[{i}]", "must be a list of step strings")
        if not cand:
            raise InvalidRequest(f"candidates[{i}]", "has no steps")
        # An empty step is scored as the models' reference code scores it (its tag follows the previous
        # one): refusing it would make clients drop it and shift step indices against their labels.
        for j, step in enumerate(cand):
            if not isinstance(step, str):
                raise InvalidRequest(f"candidates[{i}].steps[{j}]", "must be a string")
    for j, step in enumerate(request.prefix_steps):
        if not isinstance(step, str):
            raise InvalidRequest(f"prefix_steps[{j}]", "must be a string")
    if request.prefix_steps and any(isinstance(c, TokenIds) for c in request.candidates):
        raise InvalidRequest("prefix_steps", "applies to step-text candidates only, not to token ids")
    unknown = [a for a in request.aggregates if a not in AGGREGATES]
    if unknown:
        raise InvalidRequest("aggregates", f"unknown {unknown}; known: {', '.join(AGGREGATES)}")
    t = request.soft_min_temperature
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
        raise InvalidRequest("soft_min_temperature", "must be a positive number")


def estimate_tokens(request: ScoreRequest) -> int:
    """A request's size in tokens before it is tokenized, for admission: exact for token ids; for text, one
    token per 4 UTF-8 bytes plus one per step (its tag). The real count replaces it after tokenization."""
    total = 0
    context = len(request.problem.encode()) + sum(len(s.encode()) for s in request.prefix_steps)
    for cand in request.candidates:
        if isinstance(cand, TokenIds):
            total += len(cand.ids)
        else:
            total += (context + sum(len(s.encode()) for s in cand)) // 4 + len(cand) + len(request.prefix_steps)
    return total


def measured_config(bundle: Bundle, backend: Backend, config: EngineConfig) -> EngineConfig:
    """`config` with the cost ratios it leaves to the engine (-1) taken from the device's measured cost model."""
    wanted = {"attention_cost": config.attention_cost, "plain_cost": config.plain_cost}
    wanted["run_overhead_tokens"] = config.run_overhead_tokens
    if not config.measure_cost or all(v >= 0 for v in wanted.values()):
        return config
    import onnxruntime

    m = bundle.manifest
    # the graph the batches run: the cached one when the prefix cache is on
    graph = m.graph.cached_file if isinstance(backend, KvBackend) and backend.kv_cache and m.graph.cached_file else m.graph.file
    key = costmodel.cache_key(m.files[graph].sha256, backend.device, config.intra_op_threads, onnxruntime.__version__)
    model = costmodel.load_cached(bundle.path, key)
    if model is None:
        started = time.perf_counter()
        max_row = min(m.model.max_row_tokens, max(config.row_tokens, 1024))
        model = costmodel.measure(backend.run, backend.plain_rows, config.max_batch_tokens, max_row)
        log.debug("measured the run cost on %s in %.2fs", backend.device, time.perf_counter() - started)
        costmodel.store(bundle.path, key, model)
    measured = {
        "attention_cost": model.attention_cost(),
        "plain_cost": model.plain_cost(),
        "run_overhead_tokens": model.run_overhead_tokens(),
    }
    updates = {k: v for k, v in measured.items() if wanted[k] < 0 and v is not None}
    log.debug("cost model on %s: %s", backend.device, ", ".join(f"{k} {v:.3g}" for k, v in updates.items()))
    return replace(
        config,
        attention_cost=updates.get("attention_cost", config.attention_cost),
        plain_cost=updates.get("plain_cost", config.plain_cost),
        run_overhead_tokens=updates.get("run_overhead_tokens", config.run_overhead_tokens),
    )


def _device_list(device: str, devices: Iterable[int | str] | None) -> list[str]:
    if devices is None:
        return [device]
    out = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in devices]
    if not out:
        raise InvalidRequest("devices", "empty device list")
    return out


@dataclass(frozen=True)
class EngineInfo:
    model: str
    family: str
    preset: str
    precision: str
    max_seq_len: int
    max_batch_tokens: int
    devices: tuple[str, ...]
    stepscore_version: str
    onnxruntime_version: str
    manifest: dict[str, Any]


def build_result(
    items: Sequence[Formatted],
    scores: Sequence[npt.NDArray[np.float32]],
    request: ScoreRequest,
    timing: Timing,
    cached_tokens: Sequence[int] | None = None,
) -> ScoreResult:
    """The answer to `request` from its candidates' step scores: the aggregates asked for, token counts.
    (The benchmark's baselines answer through it too, so every system's result means the same.)"""
    candidates = []
    cached = cached_tokens if cached_tokens is not None else [0] * len(items)
    for item, values, from_cache in zip(items, scores, cached, strict=True):
        aggs = aggregate(values, request.aggregates, request.soft_min_temperature) if request.aggregates else {}
        candidates.append(
            CandidateScore(
                step_scores=[float(x) for x in values] if request.return_step_scores else [],
                aggregates=aggs,
                num_tokens=item.num_tokens,
                num_truncated_steps=item.num_truncated_steps,
                cached_tokens=from_cache,
            )
        )
    return ScoreResult(candidates=candidates, timing=timing, request_id=request.request_id)


class Engine:
    def __init__(self, bundle: Bundle, backends: Sequence[Backend], config: EngineConfig) -> None:
        self.bundle = bundle
        self.config = config.checked(bundle.manifest, backends[0].device if backends else "cpu")
        m = bundle.manifest
        self.formatter = Formatter(
            m.format, bundle.tokenizer_path, m.model.vocab_size, self.config.max_seq_len, self.config.text_cache_bytes
        )
        self.backends = list(backends)
        # the prefix cache, when the config gives it memory and every device runs the bundle's cached graph
        self.cache: PrefixCache | None = None
        if self.config.cache_bytes > 0 and all(isinstance(b, KvBackend) and b.kv_cache for b in self.backends):
            self.cache = PrefixCache(self.config.cache_bytes)
        self._scheduler = Scheduler(self.backends, self.config, self.cache)
        self._tokenize_pool = priority.pool(self.config.tokenizer_threads, "stepscore-tokenize", self.config.compute_nice)
        self._started = False
        self._closed = False

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike[str],
        device: str = "cpu",
        config: EngineConfig | None = None,
        devices: Iterable[int | str] | None = None,
    ) -> Engine:
        """Load a bundle (hashes checked), start one session per device and warm each up."""
        config = config or EngineConfig()
        bundle = load_bundle(path, verify=config.verify_bundle)
        resolved = config.checked(bundle.manifest, _device_list(device, devices)[0])  # fail before loading a session
        # the cost model times shapes that fit one run: the run budget is resolved first (the cost settings stay
        # -1 here, so that measured_config fills them in)
        config = replace(config, max_batch_tokens=resolved.max_batch_tokens)
        plain = bundle.plain_graph_path if config.plain_rows != "never" else None
        if config.plain_rows == "always" and plain is None:
            raise ConfigError(f"plain_rows='always' but {bundle.path} has no plain-row graph; re-export it with this version")
        # plain_rows="always" asks for one padded row per candidate through the plain graph: no cache then
        wants_cache = config.cache_bytes != 0 and config.plain_rows != "always"
        cached = bundle.cached_graph_path if wants_cache else None
        if wants_cache and cached is None:
            log.info("%s has no cached graph (exported before the prefix cache): the prefix cache is off", bundle.path)
        # With the prefix cache every batch runs the cached graph (an empty past is a tree batch): its session is
        # the only one, so the weights are held once instead of once per graph.
        tree = bundle.graph_path if cached is None else None
        if cached is not None:
            plain = None
        m = bundle.manifest.model

        def start(dev: str) -> Backend:
            backend = OrtBackend(
                tree,
                dev,
                threads=config.intra_op_threads or None,
                io_binding=config.io_binding,
                plain_graph_path=plain,
                cached_graph_path=cached,
                kv_shape=(m.num_layers, m.num_kv_heads, m.head_dim),
                cached_attention=bundle.manifest.graph.cached_attention,
            )
            backend.warmup()
            return backend

        # created on a lowered thread: onnxruntime's thread pools start with the sessions and inherit its niceness
        devs = _device_list(device, devices)
        backends = [priority.call_lowered(config.compute_nice, functools.partial(start, dev)) for dev in devs]
        return cls(bundle, backends, measured_config(bundle, backends[0], config))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Engine:
        if not self._started:
            await self._scheduler.start()
            self._started = True
        return self

    async def close(self, drain_timeout: float | None = 30.0) -> None:
        """Stop accepting requests, finish queued ones (up to `drain_timeout`), release resources."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            await self._scheduler.stop(drain_timeout)
        self._tokenize_pool.shutdown(wait=False)

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- scoring --------------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score every candidate of a request. One result or one error per call."""
        if not self._started or self._closed:
            raise Unavailable("the engine is not running" if not self._closed else "the engine is shutting down")
        started = time.perf_counter()
        # sizes first, in O(fields): nothing below reads more than the limits allow
        self.config.limits.check(request.problem, request.prefix_steps, request.candidates)
        validate_request(request)
        if request.deadline is not None and time.monotonic() >= request.deadline:
            raise DeadlineExceeded("the deadline passed before the request was queued")
        scheduler = self._scheduler
        # the request's share of the queue, taken before tokenization so that overload is answered at once;
        # from `submit` on it belongs to the queued request, which releases it however it ends
        permit = scheduler.admit(estimate_tokens(request))
        try:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            guard = WorkGuard(request.deadline)  # tokenization stops between chunks once nobody waits for it
            try:
                items = await loop.run_in_executor(self._tokenize_pool, self.formatter.format_request, request, guard.check)
            except asyncio.CancelledError:
                guard.cancel()
                raise
            tokenize_ms = (time.perf_counter() - t0) * 1000.0
        except BaseException:
            permit.release()
            raise
        if self.cache is None:
            return await self._run(request, items, items, None, permit, started, tokenize_ms)
        # from here until the scores are in, the matched nodes are locked: no eviction takes a past in use
        matches = self._match(request, items)
        try:
            work: list[Formatted] = [s for m, s in matches if s is not None]
            return await self._run(request, items, work, matches, permit, started, tokenize_ms)
        finally:
            for m, _ in matches:
                if m is not None:
                    self.cache.release(m.node)

    def _match(self, request: ScoreRequest, items: Sequence[Formatted]) -> list[tuple[Match | None, Suffix | None]]:
        """Per candidate: what the cache holds of it (locked), and the suffix left to compute (None: nothing)."""
        assert self.cache is not None
        out: list[tuple[Match | None, Suffix | None]] = []
        for item in items:
            if item.truncated_tokens:  # positions shifted by the cut: nothing to reuse, nothing to keep
                out.append((None, Suffix(item.ids, item.reads, cacheable=False)))
                continue
            m = self.cache.match(item, request.search_id)
            if m.complete:
                out.append((m, None))
                continue
            ids = item.ids[m.tokens :]
            reads = (item.reads[len(m.scores) :] - m.tokens).astype(np.int32)
            out.append((m, Suffix(ids, reads, past=m.node, search_id=request.search_id)))
        return out

    async def _run(
        self,
        request: ScoreRequest,
        items: Sequence[Formatted],
        work: Sequence[Formatted],
        matches: Sequence[tuple[Match | None, Suffix | None]] | None,
        permit: Permit,
        started: float,
        tokenize_ms: float,
    ) -> ScoreResult:
        """Queue `work` (the candidates, or their uncached suffixes), wait for its scores, answer."""
        if not work:  # everything came from the prefix cache
            permit.release()
            computed: list[npt.NDArray[np.float32]] = []
            found_tokens: list[int] = []
            timing = Timing(tokenize_ms=tokenize_ms, total_ms=(time.perf_counter() - started) * 1000.0)
        else:
            try:
                queued, future = self._scheduler.submit(work, request.deadline, permit)
            except BaseException:
                permit.release()
                raise
            if request.deadline is None:
                computed = await future
            else:
                try:
                    computed = await asyncio.wait_for(future, max(0.0, request.deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded("the deadline passed before the scores were computed") from None
            found_tokens = queued.found_tokens
            queued_at = queued.first_batch_at or queued.arrived
            timing = Timing(
                queue_ms=(queued_at - queued.arrived) * 1000.0,
                tokenize_ms=tokenize_ms,
                compute_ms=queued.compute_s * 1000.0,
                total_ms=(time.perf_counter() - started) * 1000.0,
            )
        if matches is None:
            return build_result(items, computed, request, timing)
        # each candidate's scores: the cached ones, then those just computed for its suffix
        scores: list[npt.NDArray[np.float32]] = []
        cached_tokens: list[int] = []
        pending = iter(computed)
        # tokens found in the cache after the match, when each suffix's batch was laid out (none without work)
        found = iter(found_tokens)
        for m, suffix in matches:
            held = np.asarray(m.scores if m is not None else [], dtype=np.float32)
            scores.append(held if suffix is None else np.concatenate([held, next(pending)]))
            cached_tokens.append((m.tokens if m is not None else 0) + (next(found) if suffix is not None else 0))
        return build_result(items, scores, request, timing, cached_tokens)

    def end_search(self, search_id: str) -> int:
        """Free the prefix-cache entries only `search_id` used (a finished search). Returns the bytes freed."""
        if not search_id:
            raise InvalidRequest("search_id", "must not be empty")
        return self.cache.end_search(search_id) if self.cache is not None else 0

    def check_admission(self) -> None:
        """Raise what `score` would refuse a new request with right now (Unavailable, Overloaded) without
        reserving anything: the service answers overload before it reads a request's payload."""
        if not self._started or self._closed:
            raise Unavailable("the engine is not running" if not self._closed else "the engine is shutting down")
        self._scheduler.admit(0).release()

    # -- introspection --------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Refuse new requests from now on (Unavailable); queued ones still run."""
        self._scheduler.begin_drain()

    def on_batch(self, observer: Callable[[PackedBatch, float], None]) -> None:
        """Call `observer(batch, seconds)` after every engine run (metrics)."""
        self._scheduler.on_batch.append(observer)

    @property
    def stats(self) -> SchedulerStats:
        return self._scheduler.stats

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth

    @property
    def queued_tokens(self) -> int:
        return self._scheduler.queued_tokens

    def info(self) -> EngineInfo:
        import onnxruntime

        m = self.bundle.manifest
        return EngineInfo(
            model=str(m.source.get("model", self.bundle.path)),
            family=m.family,
            preset=m.preset,
            precision=m.graph.precision,
            max_seq_len=self.config.max_seq_len,
            max_batch_tokens=self.config.max_batch_tokens,
            devices=tuple(b.device for b in self.backends),
            stepscore_version=__version__,
            onnxruntime_version=onnxruntime.__version__,
            manifest=m.to_json(),
        )


class SyncEngine:
    """A blocking facade for scripts and notebooks: the engine runs on its own event-loop thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "cpu",
        config: EngineConfig | None = None,
        devices: Iterable[int | str] | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stepscore-engine", daemon=True)
        self._thread.start()
        engine = Engine.from_bundle(path, device, config, devices)
        self.engine: Engine = self._call(engine.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(
        self,
        problem: str | ScoreRequest,
        candidates: Sequence[Sequence[str] | TokenIds] | None = None,
        **options: Any,
    ) -> ScoreResult:
        """`score(request)` or `score(problem, candidates, aggregates=("min",), ...)`."""
        request = problem if isinstance(problem, ScoreRequest) else ScoreRequest(problem, candidates or [], **options)
        result: ScoreResult = self._call(self.engine.score(request))
        return result

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult | BaseException]:
        """Submit all at once (they batch together); errors are returned in place, not raised."""

        async def run() -> list[ScoreResult | BaseException]:
            return list(await asyncio.gather(*(self.engine.score(r) for r in requests), return_exceptions=True))

        results: list[ScoreResult | BaseException] = self._call(run())
        return results

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.engine.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> SyncEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
