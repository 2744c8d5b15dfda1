"""Drivers: the closed loop answers once per request at the asked concurrency; open-loop arrivals are
seeded Poisson times, and requests go out on schedule."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from stepscore.errors import InvalidRequest
from stepscore.runtime.bench.drivers import closed_count, closed_loop, open_loop, poisson_arrivals, sweep
from stepscore.runtime.bench.systems import BatchCounters
from stepscore.runtime.types import CandidateScore, ScoreRequest, ScoreResult, Timing, TokenIds


class FakeSystem:
    """Answers after a fixed delay, counting what it was sent."""

    def __init__(self, delay: float = 0.005, sequential: bool = False, name: str = "fake") -> None:
        self.name = name
        self.sequential = sequential
        self.description = "answers after a fixed delay"
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.started: list[float] = []  # perf_counter() at each call
        self.calls = 0
        self.max_batch_tokens: int | None = 100
        self.forgotten_at: list[int] = []  # calls answered when each forget() came

    async def forget(self) -> None:
        self.forgotten_at.append(self.calls)

    async def setup(self) -> None:
        pass

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self.started.append(time.perf_counter())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if request.problem == "bad":
            raise InvalidRequest("problem", "is bad")
        self.calls += 1
        steps = [len(c.step_positions) if isinstance(c, TokenIds) else len(c) for c in request.candidates]
        cands = [CandidateScore([0.5] * n, {}, 10 * n) for n in steps]
        return ScoreResult(cands, Timing(queue_ms=1.0), request.request_id)

    async def counters(self) -> BatchCounters | None:
        return BatchCounters(self.calls, 100 * self.calls, 80 * self.calls, 90 * self.calls)

    async def close(self) -> None:
        pass


def requests(n: int, candidates: int = 2, steps: int = 3) -> list[ScoreRequest]:
    return [ScoreRequest(f"p{i}", [[f"s{k}" for k in range(steps)]] * candidates, request_id=f"r{i}") for i in range(n)]


def test_closed_loop_one_record_per_request() -> None:
    system = FakeSystem()
    point = asyncio.run(closed_loop(system, requests(10), 3, workload="w"))
    assert len(point.records) == 10 and sorted(r.index for r in point.records) == list(range(10))
    assert system.max_in_flight == 3 and point.concurrency == 3 and point.mode == "closed"
    assert all(r.ok and r.candidates == 2 and r.steps == 6 and r.tokens == 60 and r.queue_ms == 1.0 for r in point.records)
    assert point.counters is not None and point.counters.batches == 10 and point.counters.tokens_submitted == 1000
    assert point.wall_s >= 4 * system.delay and point.max_batch_tokens == 100


def test_closed_loop_cycles_and_records_errors() -> None:
    reqs = [*requests(3), ScoreRequest("bad", [["x"]])]
    point = asyncio.run(closed_loop(FakeSystem(), reqs, 2, count=8))
    assert [r.index for r in point.records] == [0, 1, 2, 3, 0, 1, 2, 3]
    failed = [r for r in point.records if not r.ok]
    assert len(failed) == 2 and failed[0].error is not None and failed[0].error.startswith("InvalidRequest")
    assert failed[0].tokens == 0


def test_poisson_arrivals_are_seeded() -> None:
    a = poisson_arrivals(50.0, 2000, seed=7)
    assert a == poisson_arrivals(50.0, 2000, seed=7)
    assert a != poisson_arrivals(50.0, 2000, seed=8)
    gaps = np.diff([0.0, *a])
    assert np.all(gaps > 0)
    assert abs(gaps.mean() - 1 / 50) < 0.1 / 50  # exponential gaps, mean 1 / rate
    assert abs(gaps.std() - 1 / 50) < 0.15 / 50  # and standard deviation 1 / rate
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 3)


def test_open_loop_sends_on_the_seeded_schedule() -> None:
    system = FakeSystem(delay=0.05)
    before = time.perf_counter()  # the loop's origin is no earlier than this
    point = asyncio.run(open_loop(system, requests(5), 100.0, count=12, seed=3))
    assert len(point.records) == 12 and point.mode == "open" and point.offered_rate == 100.0
    expected = poisson_arrivals(100.0, 12, seed=3)
    assert [r.sent_s for r in point.records] == pytest.approx(expected)
    # open loop: later requests go out while earlier ones are still running
    assert system.max_in_flight > 1
    # no request goes out before its scheduled time (a loaded machine may only delay them)
    assert all(t - before >= e - 1e-3 for t, e in zip(sorted(system.started), expected, strict=True))
    # latency counts from the scheduled arrival, so it is at least the service time
    assert all(r.latency_s >= 0.05 for r in point.records)
    timed = asyncio.run(open_loop(FakeSystem(), requests(5), 200.0, duration=0.1, seed=3))
    assert all(r.sent_s <= 0.1 for r in timed.records)


def test_sweep_baselines_and_rate_fractions() -> None:
    seen: list[str] = []
    base = FakeSystem(sequential=True, name="base")
    points = asyncio.run(
        sweep(
            base, requests(4), workload="w", concurrency=(1, 8), rate_fractions=(0.5,), progress=lambda p: seen.append(p.mode)
        )
    )
    # a sequential system runs the closed loop at concurrency 1 only, then the open loop
    assert [(p.mode, p.concurrency) for p in points] == [("closed", 1), ("open", None)] and seen == ["closed", "open"]
    best = len(points[0].records) / points[0].wall_s
    assert points[1].offered_rate == pytest.approx(0.5 * best)
    engine = FakeSystem()
    points = asyncio.run(sweep(engine, requests(4), concurrency=(1, 8), rates=(500.0,)))
    assert [p.concurrency for p in points[:2]] == [1, 8] and len(points[1].records) == closed_count(4, 8) == 32
    assert points[2].offered_rate == 500.0


def test_sweep_forgets_before_every_point() -> None:
    """Every point sends the same requests: each starts with the system's cache emptied, or a later point
    would be answered from an earlier one."""
    system = FakeSystem()
    asyncio.run(sweep(system, requests(4), concurrency=(1, 2), rates=(500.0,), open_count=3))
    assert system.forgotten_at == [0, 4, 12]  # before c=1 (4 calls), c=2 (max(4, 8) calls), the open loop
