"""Flow control for ScoreStream: what one stream may hold, and what happens when its client stops reading.

A stream's requests are *in flight* from the moment they are read until their answer has been written to
the client. Three rules keep a stream from taking the server down or starving other clients:

1. **Bounded in flight, enforced by not reading.** A stream may have at most `max_stream_inflight` requests
   in flight. At the limit the stream is simply not read: gRPC stops granting the client HTTP/2 flow-control
   window, so a client that sends without pause blocks in its own write, and the server holds no more than
   the limit (plus what the transport's window buffers), whatever the client does.
2. **Fair share.** With N streams open, each may hold at most 1/(N+1) of the queue, in requests and in
   characters (a request's size as `stepscore.runtime.limits` counts it, a stand-in for its tokens, known
   before tokenization); the +1 is kept for unary calls and for streams yet to open. A stream always may
   have one request in flight, so a request larger than a share still runs, alone.
3. **A client that stops reading is cut off.** Answers are bounded by rule 1 (an answer keeps its slot until
   written). When writing an answer makes no progress for `stall_seconds` the stream is closed with
   RESOURCE_EXHAUSTED and every request still in flight is cancelled, so the engine drops its queued work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from stepscore.errors import Overloaded

A = TypeVar("A")
Job = Callable[[], Awaitable[A]]


class StreamShares:
    """The streams open now and the share of the queue each may hold (rule 2)."""

    def __init__(self, max_inflight: int, queue_requests: int, queue_chars: int) -> None:
        self.max_inflight = max_inflight
        self.queue_requests = queue_requests
        self.queue_chars = queue_chars
        self.open_streams = 0

    def share(self) -> tuple[int, int]:
        """(requests, characters) one stream may hold now."""
        n = self.open_streams + 1  # one share stays free for unary calls and streams yet to open
        return min(self.max_inflight, max(1, self.queue_requests // n)), max(1, self.queue_chars // n)

    def open(self) -> Quota:
        self.open_streams += 1
        return Quota(self)

    def _closed(self) -> None:
        self.open_streams -= 1


class Quota:
    """One stream's requests in flight and their size, against its share."""

    def __init__(self, shares: StreamShares) -> None:
        self._shares = shares
        self.inflight = 0
        self.chars = 0
        self._freed = asyncio.Event()
        self._open = True

    def fits(self, chars: int | None) -> bool:
        """Whether one more request (of `chars` characters; None: size not known yet) fits the share."""
        if self.inflight == 0:
            return True  # alone it always runs: a request larger than a share could never run otherwise
        requests, budget = self._shares.share()
        return self.inflight < requests and (chars is None or self.chars + chars <= budget)

    async def ready(self) -> None:
        """Wait until the stream may have one more request in flight: called before reading the next one, so
        that a stream at its limit is not read at all."""
        await self._wait(None)

    async def acquire(self, chars: int) -> None:
        """Wait until a request of `chars` characters fits the stream's share, then take it."""
        await self._wait(chars)
        self.inflight += 1
        self.chars += chars

    async def _wait(self, chars: int | None) -> None:
        while not self.fits(chars):
            self._freed.clear()
            await self._freed.wait()

    def release(self, chars: int) -> None:
        self.inflight -= 1
        self.chars -= chars
        self._freed.set()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._shares._closed()


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # a write abandoned to a stalled client may fail later: nobody needs to hear of it


class _End:
    """The reader's last word: the stream is done (error None) or reading failed (error set)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def pump(
    read: Callable[[], Awaitable[bytes | None]],
    prepare: Callable[[bytes], tuple[int, Job[A]]],
    write: Callable[[A], Awaitable[None]],
    quota: Quota,
    stall_seconds: float,
) -> None:
    """Serve one stream until its client half-closes and every answer is written.

    `read()` returns the next request (None at the end of the stream); `prepare(raw)` returns the request's
    size in characters and the job that answers it (a job never raises: errors are answers too);
    `write(answer)` sends an answer. Raises Overloaded when an answer could not be written for
    `stall_seconds` (rule 3), after cancelling every request still in flight.
    """
    answers: asyncio.Queue[tuple[A, int] | _End] = asyncio.Queue()  # at most quota.inflight items (rule 1)
    running: set[asyncio.Task[None]] = set()

    async def run(job: Job[A], chars: int) -> None:
        try:
            answer = await job()
        except BaseException:
            quota.release(chars)
            raise
        answers.put_nowait((answer, chars))

    async def reader() -> None:
        try:
            while True:
                await quota.ready()  # at its limit the stream is not read: HTTP/2 flow control holds the client
                raw = await read()
                if raw is None:
                    break
                chars, job = prepare(raw)
                await quota.acquire(chars)  # a request larger than the share left waits, alone in hand
                task = asyncio.create_task(run(job, chars))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            answers.put_nowait(_End())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the writer, which raises it in the handler
            answers.put_nowait(_End(exc))

    reading = asyncio.create_task(reader())
    try:
        while True:
            item = await answers.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                break
            answer, chars = item
            sending = asyncio.ensure_future(write(answer))
            done, _ = await asyncio.wait({sending}, timeout=stall_seconds)
            if not done:
                # The write stays with gRPC (cancelling it mid-flight would break the call); the handler's
                # abort that follows goes out behind it, and the client sees it when it reads again.
                sending.add_done_callback(_retrieve)
                raise Overloaded(
                    f"the client read no answer for {stall_seconds:g}s: stream closed, {quota.inflight} requests in "
                    "flight dropped; read answers as they come, or send fewer at once"
                )
            sending.result()
            quota.release(chars)
        await reading
    finally:
        reading.cancel()
        for task in list(running):
            task.cancel()
        # wait for the cancellations to land: the engine has dropped the work when this returns
        await asyncio.gather(reading, *running, return_exceptions=True)
