"""ScoreStream flow control on its own (stepscore.runtime.service.streams), with fake read/write: a stream at its
limit is not read, a stream holds at most its share of the queue, a client that stops reading is cut off and
its work dropped. The same promises against a live server: tests/runtime/service/test_reliability.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from stepscore.errors import Overloaded
from stepscore.runtime.service.streams import Quota, StreamShares, pump


def test_a_stream_gets_a_share_of_the_queue() -> None:
    shares = StreamShares(max_inflight=64, queue_requests=12, queue_chars=1200)
    one = shares.open()
    assert shares.share() == (6, 600)  # half: the other half stays free for everyone else
    two = shares.open()
    assert shares.share() == (4, 400)
    two.close()
    two.close()  # closing twice counts once
    assert shares.share() == (6, 600)
    capped = StreamShares(2, 4096, 10**6)
    capped.open()
    assert capped.share() == (2, 500_000)  # max_stream_inflight caps it
    one.inflight, one.chars = 5, 500
    assert one.fits(100) and not one.fits(101)
    one.inflight = 6
    assert not one.fits(None)
    one.inflight, one.chars = 0, 0
    assert one.fits(10**9)  # alone, any request runs: it could never run otherwise


class FakeStream:
    """Requests to read, jobs that wait until released, a write that can be made to hang."""

    def __init__(self, n: int, chars: int = 1) -> None:
        self.pending = [f"r{i}".encode() for i in range(n)]
        self.reads = 0
        self.chars = chars
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.written: list[str] = []
        self.release = asyncio.Event()
        self.started_event = asyncio.Event()
        self.wait_for = 0
        self.hang = False

    async def read(self) -> bytes | None:
        if not self.pending:
            return None
        self.reads += 1
        return self.pending.pop(0)

    def prepare(self, raw: bytes) -> tuple[int, Callable[[], Awaitable[str]]]:
        async def job() -> str:
            self.started.append(raw.decode())
            if len(self.started) >= self.wait_for:
                self.started_event.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(raw.decode())
                raise
            return raw.decode()

        return self.chars, job

    async def write(self, answer: str) -> None:
        if self.hang:
            await asyncio.Future()  # the client reads nothing: the write never completes
        self.written.append(answer)


def test_at_its_limit_a_stream_is_not_read() -> None:
    async def run() -> None:
        fake = FakeStream(10)
        fake.wait_for = 3
        shares = StreamShares(max_inflight=3, queue_requests=100, queue_chars=10**6)
        quota = shares.open()
        task = asyncio.create_task(pump(fake.read, fake.prepare, fake.write, quota, stall_seconds=60))
        await fake.started_event.wait()
        # three requests run; the reader waits for room before it reads a fourth
        assert fake.reads == 3 and quota.inflight == 3
        fake.release.set()
        await task
        assert sorted(fake.written) == sorted(f"r{i}" for i in range(10)) and quota.inflight == 0

    asyncio.run(run())


def test_a_request_larger_than_the_share_left_waits_for_the_others() -> None:
    async def run() -> None:
        fake = FakeStream(3, chars=400)  # each request is 400 characters; the share is 600 (queue 1200, one stream)
        fake.wait_for = 1
        quota = StreamShares(max_inflight=64, queue_requests=100, queue_chars=1200).open()
        task = asyncio.create_task(pump(fake.read, fake.prepare, fake.write, quota, stall_seconds=60))
        await fake.started_event.wait()
        assert fake.started == ["r0"] and quota.chars == 400  # r1 was read but holds no slot: 800 > 600
        fake.release.set()
        await task
        assert len(fake.written) == 3

    asyncio.run(run())


def test_a_client_that_stops_reading_is_cut_off_and_its_work_dropped() -> None:
    async def run() -> None:
        fake = FakeStream(6)
        fake.hang = True
        fake.wait_for = 4
        quota = StreamShares(max_inflight=4, queue_requests=100, queue_chars=10**6).open()
        task = asyncio.create_task(pump(fake.read, fake.prepare, fake.write, quota, stall_seconds=0.05))
        await fake.started_event.wait()
        fake.release.set()  # all four answer; the first write hangs, the rest wait behind it
        with pytest.raises(Overloaded, match=r"read no answer for 0.05s: stream closed, 4 requests in flight dropped"):
            await task
        assert fake.reads == 4  # never read further

    asyncio.run(run())


def test_stalled_stream_cancels_the_requests_still_running() -> None:
    async def run() -> None:
        fake = FakeStream(3)
        fake.wait_for = 3
        quota = StreamShares(max_inflight=3, queue_requests=100, queue_chars=10**6).open()
        answered = asyncio.Event()

        async def write(answer: str) -> None:
            answered.set()
            await asyncio.Future()

        def prepare(raw: bytes) -> tuple[int, Callable[[], Awaitable[str]]]:
            chars, job = fake.prepare(raw)
            if raw == b"r0":

                async def quick() -> str:
                    return "r0"

                return chars, quick
            return chars, job

        task = asyncio.create_task(pump(fake.read, prepare, write, quota, stall_seconds=0.05))
        with pytest.raises(Overloaded):
            await task
        assert answered.is_set() and sorted(fake.cancelled) == ["r1", "r2"]  # dropped, never answered

    asyncio.run(run())


def test_quota_release_wakes_a_waiting_reader() -> None:
    async def run() -> None:
        quota = Quota(StreamShares(max_inflight=1, queue_requests=10, queue_chars=100))
        await quota.acquire(1)
        waiting = asyncio.create_task(quota.ready())
        await asyncio.sleep(0)
        assert not waiting.done()
        quota.release(1)
        await waiting

    asyncio.run(run())
