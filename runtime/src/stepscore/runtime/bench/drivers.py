"""Load drivers, shared by every system: a closed loop at a fixed concurrency, an open loop at a fixed
request rate (Poisson arrivals), and the sweeps over both.

Each sweep point yields a `PointResult`: one `RequestRecord` per request sent (errors recorded, never
raised), the wall time, and the difference of the system's batch counters over the point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stepscore.errors import StepscoreError
from stepscore.runtime.bench.systems import BatchCounters, System
from stepscore.runtime.bench.workloads import request_steps
from stepscore.runtime.types import ScoreRequest

Mode = Literal["closed", "open"]


@dataclass(frozen=True)
class RequestRecord:
    """One request of a sweep point."""

    index: int  # position in the workload's request list
    sent_s: float  # when it was due, seconds from the point's start (open loop: its scheduled arrival)
    latency_s: float  # from when it was due to its answer; an open loop's client lateness counts
    candidates: int
    steps: int
    tokens: int  # formatted tokens of its candidates, as the system reported them (0 on error)
    cached_tokens: int = 0  # of those, the tokens the system's prefix cache answered (not computed again)
    queue_ms: float | None = None  # the system's own queue time (ScoreResult.timing.queue_ms)
    error: str | None = None  # "ErrorType: message" when it failed

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PointResult:
    """Everything measured at one sweep point."""

    system: str
    workload: str
    mode: Mode
    concurrency: int | None  # closed loop
    offered_rate: float | None  # open loop, requests/s
    wall_s: float  # first send to last answer
    records: list[RequestRecord]
    counters: BatchCounters | None = None  # over this point; None where the system cannot tell
    max_batch_tokens: int | None = None


async def _one(system: System, request: ScoreRequest, index: int, due: float, origin: float) -> RequestRecord:
    candidates, steps = len(request.candidates), request_steps(request)
    try:
        result = await system.score(request)
    except (StepscoreError, OSError, ValueError) as exc:
        # a failed request is a measurement too (overload, too long, ...): record it and go on
        return RequestRecord(
            index, due - origin, time.perf_counter() - due, candidates, steps, 0, error=f"{type(exc).__name__}: {exc}"
        )
    latency = time.perf_counter() - due
    tokens = sum(c.num_tokens for c in result.candidates)
    cached = sum(c.cached_tokens for c in result.candidates)
    return RequestRecord(
        index, due - origin, latency, candidates, steps, tokens, cached_tokens=cached, queue_ms=result.timing.queue_ms
    )


def _diff(after: BatchCounters | None, before: BatchCounters | None) -> BatchCounters | None:
    return after - before if after is not None and before is not None else None


async def closed_loop(
    system: System,
    requests: Sequence[ScoreRequest],
    concurrency: int,
    *,
    count: int | None = None,
    workload: str = "",
    searches_in_order: bool = True,
) -> PointResult:
    """`concurrency` callers, each sending its next request as soon as its previous one is answered.

    Sends `count` requests (default: each request once), cycling through `requests` in order; returns
    one record per request sent, in the order they were sent. With `searches_in_order`, a request whose
    search (its `search_id`) has a call unanswered waits for that answer first, as a search client does:
    a beam search sends iteration t + 1 only once iteration t is scored.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not requests:
        raise ValueError("closed_loop needs at least one request")
    total = len(requests) if count is None else count
    records: list[RequestRecord | None] = [None] * total
    next_index = 0
    origin = time.perf_counter()

    busy: dict[str, asyncio.Event] = {}  # searches with a call unanswered

    async def caller() -> None:
        nonlocal next_index
        while next_index < total:
            k = next_index
            next_index += 1  # no await between the check and the claim: one event loop, no race
            request = requests[k % len(requests)]
            search = request.search_id if searches_in_order else ""
            while search in busy:  # waiters wake in the order they claimed: the search's calls stay in order
                await busy[search].wait()
            if search:
                busy[search] = asyncio.Event()
            try:
                records[k] = await _one(system, request, k % len(requests), time.perf_counter(), origin)
            finally:
                if search:
                    busy.pop(search).set()

    before = await system.counters()
    origin = time.perf_counter()  # after the scrape: the point's clock starts with its first request
    await asyncio.gather(*(caller() for _ in range(min(concurrency, total))))
    wall = time.perf_counter() - origin
    after = await system.counters()
    done = [r for r in records if r is not None]
    return PointResult(
        system.name, workload, "closed", concurrency, None, wall, done, _diff(after, before), system.max_batch_tokens
    )


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds from 0) of `count` requests of a Poisson process at `rate` requests/s.

    Inter-arrival gaps are exponential with mean 1 / rate, drawn from a seeded generator, so the same
    seed gives the same schedule on every run and every system.
    """
    if rate <= 0:
        raise ValueError(f"the rate must be positive, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return [float(t) for t in np.cumsum(gaps)]


async def open_loop(
    system: System,
    requests: Sequence[ScoreRequest],
    rate: float,
    *,
    count: int | None = None,
    duration: float | None = None,
    seed: int = 0,
    workload: str = "",
) -> PointResult:
    """Requests arrive at Poisson times at `rate` requests/s, whether or not earlier ones are answered.

    Sends `count` requests (default: each request once), or those arriving within `duration` seconds
    when it is given, cycling through `requests`. A request's latency runs from its scheduled arrival,
    so a late sender shows up as latency instead of hiding it (no coordinated omission).
    """
    if not requests:
        raise ValueError("open_loop needs at least one request")
    if duration is not None:
        # enough arrivals to cover the duration with a wide margin, then cut at it
        n = max(1, int(rate * duration * 2 + 20))
        arrivals = [t for t in poisson_arrivals(rate, n, seed) if t <= duration]
    else:
        arrivals = poisson_arrivals(rate, len(requests) if count is None else count, seed)
    before = await system.counters()
    origin = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for k, at in enumerate(arrivals):
        due = origin + at
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        index = k % len(requests)
        tasks.append(asyncio.create_task(_one(system, requests[index], index, due, origin)))
    records = list(await asyncio.gather(*tasks))
    wall = time.perf_counter() - origin
    after = await system.counters()
    return PointResult(system.name, workload, "open", None, rate, wall, records, _diff(after, before), system.max_batch_tokens)


# --- sweeps --------------------------------------------------------------------------------------


Progress = Callable[[PointResult], None]


def closed_count(requests: int, concurrency: int) -> int:
    """Requests a closed-loop point sends: each once, but at least 4 per caller, so that the window is
    full for most of the point rather than ramping up and down."""
    return max(requests, 4 * concurrency)


async def warm_up(system: System, requests: Sequence[ScoreRequest], count: int, concurrency: int = 4) -> None:
    """Unmeasured requests first: first runs of new shapes (allocations, kernel choices) are slow."""
    if count > 0 and requests:
        await closed_loop(system, requests, min(concurrency, count), count=count)


async def sweep(
    system: System,
    requests: Sequence[ScoreRequest],
    *,
    workload: str = "",
    concurrency: Sequence[int] = (1, 4, 16, 64),
    rates: Sequence[float] = (),
    rate_fractions: Sequence[float] = (),
    open_count: int | None = None,
    open_duration: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[PointResult]:
    """The closed loop at every concurrency, then the open loop at every rate.

    Sequential systems (the baselines) run the closed loop at concurrency 1 only: they take one request
    at a time, so more callers would only add waiting. Open-loop rates are `rates` (requests/s), or
    `rate_fractions` of the highest request rate this system reached in the closed loop.

    Every point sends the same requests, so each starts with `system.forget()`: a prefix cache must not
    answer a point from what the warm-up or the point before it left (that would measure the cache, not the
    traffic). Within a point, later calls of a search do find its earlier calls: that is the traffic.
    """
    points: list[PointResult] = []
    levels = [1] if system.sequential and concurrency else list(concurrency)
    for c in levels:
        await system.forget()
        point = await closed_loop(system, requests, c, count=closed_count(len(requests), c), workload=workload)
        points.append(point)
        if progress is not None:
            progress(point)
    offered = list(rates)
    if not offered and rate_fractions:
        best = max((_ok_rate(p) for p in points), default=0.0)
        if best <= 0:
            raise StepscoreError(
                f"{system.name} on {workload}: no closed-loop rate to take fractions of (run a closed loop, or give --rates)"
            )
        offered = [f * best for f in rate_fractions]
    for k, rate in enumerate(offered):
        await system.forget()
        point = await open_loop(
            system, requests, rate, count=open_count, duration=open_duration, seed=seed + k, workload=workload
        )
        points.append(point)
        if progress is not None:
            progress(point)
    return points


def _ok_rate(point: PointResult) -> float:
    ok = sum(1 for r in point.records if r.ok)
    return ok / point.wall_s if point.wall_s > 0 else 0.0
