"""The scheduler: the one owner of the request queue.

Handlers never touch the queue: they reserve admission, `submit()` formatted candidates and await the
returned future. One batching task cuts batches by a token budget and a maximum wait, drops entries whose
caller gave up or whose deadline passed, packs the batch on a worker thread, and hands it to a device
worker through a slot per device, so exactly one batch is prepared while each device runs the current
one. Device workers run the backend off the event loop and scatter the scores back to the entries.

A request larger than the budget is split across batches (its future resolves when its last candidate is
scored); it is never rejected for its size alone. Admission is bounded by requests and by tokens, and
the check-and-reserve happens on the event loop thread, so it is atomic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stepscore.errors import DeadlineExceeded, ModelOutputError, Overloaded, Unavailable, report_internal
from stepscore.runtime.backend import Backend
from stepscore.runtime.config import EngineConfig, default_plain_cost, default_run_overhead
from stepscore.runtime.packing import PackedBatch, PackOptions, SharedTokenCounter, pack
from stepscore.runtime.types import Formatted

log = logging.getLogger(__name__)

Scores = list[npt.NDArray[np.float32]]


@dataclass(eq=False)
class Entry:
    """One request in the queue: its formatted candidates and where their scores go."""

    seq: int
    items: Sequence[Formatted]
    future: asyncio.Future[Scores]
    deadline: float | None
    tokens: int
    enqueued_at: float
    pending: deque[int] = field(default_factory=deque)  # candidates not yet in a batch
    scores: list[npt.NDArray[np.float32] | None] = field(default_factory=list)
    remaining: int = 0
    first_batch_at: float | None = None
    compute_s: float = 0.0
    in_queue: bool = False

    def dead(self, now: float) -> bool:
        """Drop it: the caller gave up, or the deadline passed (then tell the caller so)."""
        if self.future.done():
            return True
        if self.deadline is not None and now >= self.deadline:
            self.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return True
        return False


@dataclass
class _Prepared:
    batch: PackedBatch
    members: list[tuple[Entry, int]]  # (entry, candidate index) for each packed item


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
    def __init__(self, backends: Sequence[Backend], config: EngineConfig) -> None:
        if not backends:
            raise ValueError("the scheduler needs at least one backend")
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
        )
        self.stats = SchedulerStats()
        # called after every engine run with (batch, seconds); metrics subscribe here
        self.on_batch: list[Callable[[PackedBatch, float], None]] = []
        self._queue: deque[Entry] = deque()
        self._queued_tokens = 0  # tokens of candidates not yet in a batch
        self._admitted_requests = 0
        self._admitted_tokens = 0
        self._seq = 0
        self._running = 0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepscore-pack")
        self._device_pools = [
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"stepscore-{b.device}") for b in backends
        ]
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._ready: asyncio.Queue[_Prepared] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(len(self._backends))
        self._ready = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._batcher(), name="stepscore-batcher")]
        for backend, pool in zip(self._backends, self._device_pools, strict=True):
            self._tasks.append(asyncio.create_task(self._device(backend, pool), name=f"stepscore-{backend.device}"))

    def begin_drain(self) -> None:
        """Refuse new work from now on; queued work continues."""
        self._closing = True

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new work; let queued work finish (up to `drain_timeout`), then fail the rest."""
        self._closing = True
        deadline = None if drain_timeout is None else time.monotonic() + drain_timeout
        while self._admitted_requests and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        for entry in list(self._queue):
            if not entry.future.done():
                entry.future.set_exception(Unavailable("the server shut down before this request ran"))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._prep_pool.shutdown(wait=False)
        for pool in self._device_pools:
            pool.shutdown(wait=True)

    # -- admission ------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._admitted_requests

    @property
    def queued_tokens(self) -> int:
        return self._admitted_tokens

    def reserve_request(self) -> None:
        """Take a request slot before any work is done for it (raises Overloaded / Unavailable)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        cfg = self._config
        if self._admitted_requests >= cfg.max_queued_requests:
            raise Overloaded(f"queue full: {self._admitted_requests} requests queued (max {cfg.max_queued_requests})")
        if self._admitted_tokens >= cfg.max_queued_tokens:
            raise Overloaded(f"queue full: {self._admitted_tokens} tokens queued (max {cfg.max_queued_tokens})")
        self._admitted_requests += 1

    def release_request(self) -> None:
        """Give back a slot whose request never reached `submit` (bad input, overload on tokens)."""
        self._admitted_requests -= 1

    def submit(self, items: Sequence[Formatted], deadline: float | None) -> Entry:
        """Queue a reserved request's candidates. Raises Overloaded if its tokens do not fit the cap."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        tokens = sum(item.num_tokens for item in items)
        cap = self._config.max_queued_tokens
        # A request alone in the queue is admitted whatever its size: it could never run otherwise.
        if self._admitted_tokens and self._admitted_tokens + tokens > cap:
            raise Overloaded(f"queue full: {self._admitted_tokens} + {tokens} tokens would exceed {cap}")
        loop = asyncio.get_running_loop()
        self._seq += 1
        entry = Entry(
            seq=self._seq,
            items=items,
            future=loop.create_future(),
            deadline=deadline,
            tokens=tokens,
            enqueued_at=time.monotonic(),
            pending=deque(range(len(items))),
            scores=[None] * len(items),
            remaining=len(items),
            in_queue=True,
        )
        self._admitted_tokens += tokens
        entry.future.add_done_callback(lambda _f: self._finished(entry))
        self._queue.append(entry)
        self._queued_tokens += tokens
        assert self._wake is not None, "scheduler not started"
        self._wake.set()
        return entry

    def _finished(self, entry: Entry) -> None:
        # Runs for every submitted entry exactly once (result, error or cancellation): admission is
        # released here and only here. Queue accounting belongs to the batcher (`_drop_dead`).
        self._admitted_tokens -= entry.tokens
        self._admitted_requests -= 1
        self.stats.requests_done += 1
        if self._wake is not None:
            self._wake.set()

    # -- batching -------------------------------------------------------------------------------

    def _drop_dead(self, now: float) -> None:
        kept: deque[Entry] = deque()
        for entry in self._queue:
            if entry.pending and not entry.dead(now):
                kept.append(entry)
                continue
            if entry.pending:
                self.stats.dropped += 1
                self._queued_tokens -= sum(entry.items[i].num_tokens for i in entry.pending)
                entry.pending.clear()
            entry.in_queue = False
        self._queue = kept

    def _cut(self) -> list[tuple[Entry, int]]:
        """Take candidates in arrival order until the token budget is used (at least one)."""
        # plain rows for every batch share nothing: count every candidate's tokens in full
        sharing = self._config.share_prefixes and self._pack.plain_cost != 0.0
        counter = SharedTokenCounter(sharing, self._config.min_shared_tokens)
        budget = self._config.max_batch_tokens
        chosen: list[tuple[Entry, int]] = []
        now = time.monotonic()
        while self._queue:
            entry = self._queue[0]
            while entry.pending:
                item = entry.items[entry.pending[0]]
                if chosen and counter.total + counter.cost(item.ids) > budget:
                    return chosen
                counter.add(item.ids)
                chosen.append((entry, entry.pending.popleft()))
                self._queued_tokens -= item.num_tokens
                if entry.first_batch_at is None:
                    entry.first_batch_at = now
            entry.in_queue = False
            self._queue.popleft()
        return chosen

    def _put_back(self, members: list[tuple[Entry, int]]) -> None:
        """Candidates that did not fit the packed batch go back to the front, in order."""
        touched: dict[int, Entry] = {}
        for entry, index in reversed(members):
            entry.pending.appendleft(index)
            self._queued_tokens += entry.items[index].num_tokens
            touched[entry.seq] = entry
        for entry in sorted(touched.values(), key=lambda e: -e.seq):
            if not entry.in_queue:
                entry.in_queue = True
                self._queue.appendleft(entry)

    async def _next_batch(self) -> list[tuple[Entry, int]]:
        assert self._wake is not None
        cfg = self._config
        while True:
            self._wake.clear()
            now = time.monotonic()
            self._drop_dead(now)
            if self._queue:
                if self._queued_tokens >= cfg.max_batch_tokens:
                    return self._cut()
                if self._running < len(self._backends):
                    # A device is idle: give the batch up to max_wait to fill.
                    wait = self._queue[0].enqueued_at + cfg.max_wait_ms / 1000.0 - now
                    if wait <= 0:
                        return self._cut()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    continue
                # every device is busy: cut when the budget fills or a device frees up
            # Deadlines of queued entries also wake us, so expired work is dropped promptly.
            timeout = self._next_deadline(now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _next_deadline(self, now: float) -> float | None:
        deadlines = [e.deadline for e in self._queue if e.deadline is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    async def _batcher(self) -> None:
        assert self._slots is not None and self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # at most one prepared batch per device
            members = await self._next_batch()
            items = [entry.items[index] for entry, index in members]
            try:
                batch = await loop.run_in_executor(self._prep_pool, pack, items, self._pack, self._config.max_batch_tokens)
            except Exception as exc:  # noqa: BLE001 - logged with an error id; every caller gets that id
                error = report_internal(log, exc, "packing failed")
                for entry, _ in members:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                self._slots.release()
                continue
            if batch.leftover:
                left = set(batch.leftover)
                self._put_back([m for k, m in enumerate(members) if k in left])
            self._ready.put_nowait(_Prepared(batch, members))

    # -- devices --------------------------------------------------------------------------------

    async def _device(self, backend: Backend, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        assert self._slots is not None and self._ready is not None and self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            prepared = await self._ready.get()
            self._slots.release()
            live = [m for m in prepared.members if not m[0].future.done()]
            if not live:  # everyone gave up while the batch waited: skip the compute
                self.stats.dropped += len({id(e) for e, _ in prepared.members})
                continue
            batch = prepared.batch
            self._running += 1
            started = time.perf_counter()
            try:
                scores = await loop.run_in_executor(pool, backend.run, batch)
            except Exception as exc:  # noqa: BLE001 - logged with an error id; every caller gets that id
                error = report_internal(log, exc, f"engine run failed on {backend.device} (batch {batch.shape})")
                for entry, _ in prepared.members:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                continue
            finally:
                self._running -= 1
                self._wake.set()
            elapsed = time.perf_counter() - started
            self._record(batch, elapsed)
            self._scatter(prepared, scores.reshape(-1), elapsed)

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

    def _scatter(self, prepared: _Prepared, flat: npt.NDArray[np.float32], elapsed: float) -> None:
        leftover = set(prepared.batch.leftover)
        charged: set[int] = set()
        for k, (entry, index) in enumerate(prepared.members):
            if k in leftover or entry.future.done():
                continue
            if entry.seq not in charged:
                entry.compute_s += elapsed
                charged.add(entry.seq)
            values = flat[prepared.batch.item_reads[k]]
            if not np.isfinite(values).all():
                entry.future.set_exception(
                    ModelOutputError(f"the model produced NaN or inf for candidate {index}; no score returned")
                )
                continue
            entry.scores[index] = values
            entry.remaining -= 1
            if entry.remaining == 0:
                entry.future.set_result([s for s in entry.scores if s is not None])
