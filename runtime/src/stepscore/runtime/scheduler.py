"""The scheduler's async layer: it feeds the scheduling core (`stepscore.runtime.core`, where every decision
is made), runs the core's plans and delivers its outcomes.

One batching task asks the core for the next plan (waking when the core says something may be due: the
oldest request's wait, a deadline, new input, a free device), packs it on a worker thread, and hands it to a
device worker through a slot per device, so exactly one batch is prepared while each device runs the
current one. Device workers run the backend off the event loop and report the scores to the core, which
says which requests are finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stepscore.errors import ConfigError, Unavailable, report_internal
from stepscore.runtime import priority
from stepscore.runtime.backend import Backend, KvBackend, Present
from stepscore.runtime.cachedbatch import Suffix, pack_cached, relative, suffix_kv
from stepscore.runtime.config import EngineConfig, default_plain_cost, default_run_overhead
from stepscore.runtime.core import CoreConfig, Outcome, Permit, Plan, Request, SchedulingCore, Scores
from stepscore.runtime.packing import PackedBatch, PackOptions, pack
from stepscore.runtime.prefixcache import PrefixCache
from stepscore.runtime.types import Formatted

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    batch: PackedBatch
    plan: Plan
    kept: list[int]  # for each member left in the plan, its index among the items given to the packer


@dataclass
class SchedulerStats:
    """Cumulative counters (read by metrics and benchmarks)."""

    batches: int = 0
    requests_done: int = 0
    tokens_submitted: int = 0  # candidate tokens sent to batches
    tokens_used: int = 0  # tokens laid out in rows, after prefix sharing
    tokens_computed: int = 0  # rows x row length, padding included
    reads_computed: int = 0
    compute_s: float = 0.0
    dropped: int = 0  # entries dropped before compute (cancelled or past deadline)
    last_batch_shape: tuple[int, int] = (0, 0)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens_used / max(1, self.tokens_computed)


def _plain_cost(config: EngineConfig, backends: Sequence[Backend]) -> float | None:
    # Every device must run plain batches natively for the packer to choose them.
    if config.plain_rows == "never" or not all(b.plain_rows for b in backends):
        return None
    if config.plain_rows == "always":
        return 0.0
    return config.plain_cost if config.plain_cost >= 0 else default_plain_cost(backends[0].device)


def _run_overhead(config: EngineConfig, backends: Sequence[Backend]) -> float | None:
    if config.run_overhead_tokens == 0:
        return None
    return config.run_overhead_tokens if config.run_overhead_tokens > 0 else default_run_overhead(backends[0].device)


class Scheduler:
    """Feeds the core, runs its plans on the devices, delivers its outcomes to the waiting callers."""

    def __init__(self, backends: Sequence[Backend], config: EngineConfig, cache: PrefixCache | None = None) -> None:
        if not backends:
            raise ValueError("the scheduler needs at least one backend")
        if cache is not None and not all(isinstance(b, KvBackend) for b in backends):
            raise ConfigError("the prefix cache needs backends that run the cached graph")
        # With a cache, every batch runs the cached graph: its items are `Suffix`es (stepscore.runtime.cachedbatch)
        # and their K/V go into the cache after the run.
        self._cache = cache
        self._backends = list(backends)
        self._config = config
        self._pack = PackOptions(
            share_prefixes=config.share_prefixes,
            pack_rows=config.pack_rows,
            row_tokens=config.row_tokens,
            row_multiple=config.row_multiple,
            min_shared=config.min_shared_tokens,
            attention_cost=max(0.0, config.attention_cost),
            plain_cost=_plain_cost(config, self._backends),
            run_overhead=_run_overhead(config, self._backends),
            past_padded=any(b.past_padded for b in self._backends if isinstance(b, KvBackend)),
        )
        self.core = SchedulingCore(
            CoreConfig(
                max_batch_tokens=config.max_batch_tokens,
                max_wait_s=config.max_wait_ms / 1000.0,
                # plain rows for every batch share nothing: the budget then counts every candidate in full
                share_prefixes=config.share_prefixes and self._pack.plain_cost != 0.0,
                min_shared_tokens=config.min_shared_tokens,
                max_queued_requests=config.max_queued_requests,
                max_queued_tokens=config.max_queued_tokens,
            )
        )
        self.stats = SchedulerStats()
        # called after every engine run with (batch, seconds); metrics subscribe here
        self.on_batch: list[Callable[[PackedBatch, float], None]] = []
        self._futures: dict[int, asyncio.Future[Scores]] = {}
        self._running = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[None]] = set()  # batches whose K/V are going into the cache
        self._prep_pool = priority.pool(1, "stepscore-pack", config.compute_nice)
        self._device_pools = [priority.pool(1, f"stepscore-{b.device}", config.compute_nice) for b in backends]
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None  # set while no request is unfinished (drain waits on it)
        self._slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Queue[_Prepared] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._slots = asyncio.Semaphore(len(self._backends))
        self._ready = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._batcher(), name="stepscore-batcher")]
        for backend, pool in zip(self._backends, self._device_pools, strict=True):
            self._tasks.append(asyncio.create_task(self._device(backend, pool), name=f"stepscore-{backend.device}"))

    def begin_drain(self) -> None:
        """Refuse new work from now on; queued work continues."""
        self.core.close()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new work; let queued work finish (up to `drain_timeout`), then fail the rest."""
        self.core.close()
        if self._idle is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
        if self._finishing:  # computed batches: their scores are due (a few ms each)
            await asyncio.gather(*self._finishing, return_exceptions=True)
        self._deliver(self.core.fail_all(Unavailable("the server shut down before this request ran")))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._prep_pool.shutdown(wait=False)
        for pool in self._device_pools:
            pool.shutdown(wait=True)

    # -- admission and intake -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self.core.admission.requests

    @property
    def queued_tokens(self) -> int:
        return self.core.admission.tokens

    def admit(self, estimated_tokens: int) -> Permit:
        """A permit for a request of about this size, before any work is done for it (raises Overloaded /
        Unavailable at once). The caller releases it if the request fails before `submit`."""
        return self.core.admit(estimated_tokens)

    def submit(
        self, items: Sequence[Formatted], deadline: float | None, permit: Permit
    ) -> tuple[Request, asyncio.Future[Scores]]:
        """Queue a request's candidates; the permit passes to the request. The future gets the scores or the
        error; cancelling it (the caller gave up) ends the request."""
        request = self.core.add(items, deadline, time.monotonic(), permit)
        future: asyncio.Future[Scores] = asyncio.get_running_loop().create_future()
        self._futures[request.rid] = future
        future.add_done_callback(lambda f: self._caller_done(request.rid, f))
        assert self._wake is not None and self._idle is not None, "scheduler not started"
        self._idle.clear()
        self._wake.set()
        return request, future

    def _caller_done(self, rid: int, future: asyncio.Future[Scores]) -> None:
        if future.cancelled():  # the caller gave up (client gone, its own deadline): end it in the core
            self._deliver([o for o in [self.core.cancel(rid)] if o is not None])

    def _deliver(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        for outcome in outcomes:
            self.stats.requests_done += 1
            future = self._futures.pop(outcome.request.rid, None)
            if future is None or future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                assert outcome.scores is not None
                future.set_result(outcome.scores)
        self.stats.dropped = self.core.dropped
        if self._idle is not None and not self.core.unfinished:
            self._idle.set()
        if self._wake is not None:
            self._wake.set()

    # -- batching -------------------------------------------------------------------------------

    async def _next_plan(self) -> Plan:
        assert self._wake is not None
        while True:
            self._wake.clear()
            now = time.monotonic()
            self._deliver(self.core.expire(now))
            idle = self._running < len(self._backends)
            plan = self.core.plan(now, idle)
            if plan is not None:
                return plan
            wake_at = self.core.next_wake(now, idle)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if wake_at is None else max(0.0, wake_at - now))

    async def _batcher(self) -> None:
        assert self._slots is not None and self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # at most one prepared batch per device
            plan = await self._next_plan()
            try:
                batch = await loop.run_in_executor(self._prep_pool, self._layout, plan.items)
            except Exception as exc:  # noqa: BLE001 - logged with an error id; every caller gets that id
                self._deliver(self.core.fail(plan, report_internal(log, exc, "packing failed")))
                self._slots.release()
                continue
            left = set(batch.leftover)
            kept = [k for k in range(len(plan.members)) if k not in left]
            self.core.requeue(plan, batch.leftover)
            self._ready.put_nowait(_Prepared(batch, plan, kept))

    def _layout(self, items: Sequence[Formatted]) -> PackedBatch:
        if self._cache is None:
            return pack(items, self._pack, self._config.max_batch_tokens)
        suffixes = [item for item in items if isinstance(item, Suffix)]
        assert len(suffixes) == len(items), "with a prefix cache the engine queues Suffix items"
        return pack_cached(suffixes, self._cache, self._pack, self._config.max_batch_tokens)

    # -- devices --------------------------------------------------------------------------------

    async def _device(self, backend: Backend, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        assert self._slots is not None and self._ready is not None and self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            prepared = await self._ready.get()
            self._slots.release()
            if not self.core.live(prepared.plan):  # everyone gave up while the batch waited: skip the compute
                self._wake.set()
                continue
            batch = prepared.batch
            self._running += 1
            started = time.perf_counter()
            try:
                if batch.past_len is not None:
                    assert isinstance(backend, KvBackend)
                    scores, present = await loop.run_in_executor(pool, backend.run_cached, batch)
                else:
                    scores, present = await loop.run_in_executor(pool, backend.run, batch), None
            except Exception as exc:  # noqa: BLE001 - logged with an error id; every caller gets that id
                error = report_internal(log, exc, f"engine run failed on {backend.device} (batch {batch.shape})")
                self._deliver(self.core.fail(prepared.plan, error))
                continue
            finally:
                self._running -= 1
                self._wake.set()
            elapsed = time.perf_counter() - started
            self._record(batch, elapsed)
            flat = scores.reshape(-1)
            values = [flat[batch.item_reads[k]] for k in prepared.kept]
            found: list[int] | None = None
            if batch.item_known is not None:  # what the cache held beyond an item's own node: its scores come first
                known = [batch.item_known[k] for k in prepared.kept]
                values = [np.concatenate((kn.scores, v)) for kn, v in zip(known, values, strict=True)]
                found = [kn.tokens for kn in known]
            if present is None:
                self._deliver(self.core.complete(prepared.plan, values, elapsed, found))
                continue
            # Copying the new K/V into the cache takes a few ms a batch: on the packing thread, while the device
            # runs the next batch (done in line, the device sat idle about 7% of a Best-of-N run). The requests
            # complete after it, so they hold the nodes they continue until their suffixes are in.
            task = asyncio.create_task(self._remember_then_complete(prepared, present, values, elapsed, found))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _remember_then_complete(
        self,
        prepared: _Prepared,
        present: Present,
        values: Sequence[npt.NDArray[np.float32]],
        elapsed: float,
        found: Sequence[int] | None,
    ) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._prep_pool, self._remember, prepared, present, values)
        except Exception as exc:  # noqa: BLE001 - the scores stand; only their caching failed
            report_internal(log, exc, "caching a batch's K/V failed")
        self._deliver(self.core.complete(prepared.plan, values, elapsed, found))

    def _remember(self, prepared: _Prepared, present: Present, values: Sequence[npt.NDArray[np.float32]]) -> None:
        """Put the suffixes just computed into the prefix cache (before their requests complete and release
        the nodes they continue)."""
        assert self._cache is not None
        # after requeue the plan holds the kept members only, in order: member j is the batch's item kept[j]
        items = prepared.plan.items
        for item, k, scores in zip(items, prepared.kept, values, strict=True):
            if not isinstance(item, Suffix) or not item.cacheable or item.past is None:
                continue
            bases = prepared.batch.item_base
            base = bases[k] if bases is not None else item.past
            if base is not None and base.end > item.start:
                # the row continued a node below the item's own (cached since it was queued): the batch computed
                # its tokens from there on only. Inserted from the item's node, which its request holds (the
                # deeper one may be gone by now: then nothing is cached below the gap)
                kv = suffix_kv(present, prepared.batch, k, skipped=base.end - item.start)
                self._cache.insert(item.past, item.ids, item.reads, kv, [float(x) for x in scores], item.search_id)
                continue
            kv = suffix_kv(present, prepared.batch, k)
            # the item ran from `base` (its own node, or an ancestor whose later segments ran again)
            laid, _, held = relative(item, base, self._cache)
            chain_scores = held + [float(x) for x in scores]
            self._cache.insert(base or self._cache.root, laid.ids, laid.reads, kv, chain_scores, item.search_id)

    def _record(self, batch: PackedBatch, elapsed: float) -> None:
        s = self.stats
        s.batches += 1
        s.tokens_submitted += batch.tokens_submitted
        s.tokens_used += batch.tokens_used
        s.tokens_computed += batch.tokens_computed
        s.reads_computed += batch.reads_computed
        s.compute_s += elapsed
        s.last_batch_shape = batch.shape
        for observer in self.on_batch:
            observer(batch, elapsed)
