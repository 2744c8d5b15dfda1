"""The scheduling core: every decision about admitted work, made synchronously from explicit state.

No threads, no awaits, no clock reads: time is an argument. The async layer (`stepscore.runtime.scheduler`)
feeds it (`add`, `cancel`, `expire`), asks it for work (`plan`), runs the planned batches on the devices and
reports back (`requeue` after packing, `complete` or `fail` after the run). Every call that ends requests
returns their `Outcome`s; the layer only delivers them. This is what lets tests drive every policy here with
a fake clock and property tests, and what later lets cached prefixes take part in the decisions.

Policies:
- admission: one `Permit` per request, taken for its estimated size before any work (tokenization), resized
  to its real size after, released exactly once when the request ends, whatever the path (scores, error,
  cancel, deadline, client gone). The `Admission` budget is the one owner of the queued counts.
- batches: candidates in arrival order (FIFO) until the token budget is used; a request larger than the budget
  is split across batches and is never starved, since nothing overtakes the head of the queue; candidates the
  packer could not fit go back to the front, in order.
- waiting: with a device idle, a batch that is not full waits at most `max_wait_s` after its oldest request
  arrived; with every device busy, it is cut as soon as the budget is full.
- deadlines and cancellation: a request past its deadline or cancelled ends at once; its queued candidates
  never reach a batch, and scores of its candidates already in flight are discarded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from stepscore.errors import Cancelled, DeadlineExceeded, ModelOutputError, Overloaded, StepscoreError, Unavailable
from stepscore.runtime.packing import SharedTokenCounter
from stepscore.runtime.types import Formatted

Scores = list[npt.NDArray[np.float32]]


class Admission:
    """The budget of admitted, unfinished work: requests and tokens. Only `Permit`s change it."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0
        self.closing = False

    def acquire(self, tokens: int) -> Permit:
        """A permit for one request of about `tokens` tokens, or Overloaded / Unavailable at once."""
        if self.closing:
            raise Unavailable("the server is shutting down")
        if self.requests >= self.max_requests:
            raise Overloaded(f"queue full: {self.requests} requests queued (max {self.max_requests})")
        self._check_tokens(tokens)
        self.requests += 1
        self.tokens += tokens
        return Permit(self, tokens)

    def _check_tokens(self, tokens: int) -> None:
        # a request alone is admitted whatever its size: it could never run otherwise
        if self.tokens and self.tokens + tokens > self.max_tokens:
            raise Overloaded(f"queue full: {self.tokens} + {tokens} tokens would exceed {self.max_tokens}")


class Permit:
    """One request's share of the admission budget."""

    def __init__(self, admission: Admission, tokens: int) -> None:
        self._admission = admission
        self.tokens = tokens
        self.released = False

    def resize(self, tokens: int) -> None:
        """Hold `tokens` instead (the real size, once known). Raises Overloaded, holding the old size, if the
        growth does not fit."""
        if self.released:
            raise RuntimeError("resize of a released permit")
        a = self._admission
        grow = tokens - self.tokens
        if grow > 0:
            others = a.tokens - self.tokens
            if others and others + tokens > a.max_tokens:
                raise Overloaded(f"queue full: {others} + {tokens} tokens would exceed {a.max_tokens}")
        a.tokens += grow
        self.tokens = tokens

    def release(self) -> bool:
        """Give the share back. True the first time; later calls do nothing (every path may call it)."""
        if self.released:
            return False
        self.released = True
        self._admission.requests -= 1
        self._admission.tokens -= self.tokens
        return True


@dataclass(eq=False)
class Request:
    """One admitted request as the core sees it."""

    rid: int
    items: Sequence[Formatted]
    deadline: float | None
    arrived: float
    permit: Permit
    pending: deque[int] = field(default_factory=deque)  # candidates not yet in a batch
    scores: list[npt.NDArray[np.float32] | None] = field(default_factory=list)
    remaining: int = 0  # candidates without a score yet
    # per candidate: tokens the prefix cache held beyond what the candidate matched when it was queued, found
    # when its batch was laid out (stepscore.runtime.cachedbatch: batches before it cached them)
    found_tokens: list[int] = field(default_factory=list)
    first_batch_at: float | None = None
    compute_s: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class Outcome:
    """How a request ended: scores (one array per candidate) or one error."""

    request: Request
    scores: Scores | None = None
    error: StepscoreError | None = None


@dataclass
class Plan:
    """A batch to run: (request, candidate index) per item, in the order given to the packer."""

    id: int
    members: list[tuple[Request, int]]

    @property
    def items(self) -> list[Formatted]:
        return [r.items[i] for r, i in self.members]


@dataclass(frozen=True)
class CoreConfig:
    max_batch_tokens: int
    max_wait_s: float
    share_prefixes: bool  # the budget counts a shared prefix once
    min_shared_tokens: int
    max_queued_requests: int
    max_queued_tokens: int


class SchedulingCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self._queue: deque[Request] = deque()  # requests with pending candidates, in arrival order
        self._requests: dict[int, Request] = {}  # every unfinished request
        self._next_rid = 0
        self._next_plan = 0
        self.queued_candidate_tokens = 0  # tokens of candidates waiting for a batch
        self.dropped = 0  # requests that ended before all their candidates ran (deadline, cancel)

    # -- intake -----------------------------------------------------------------------------------

    def admit(self, estimated_tokens: int) -> Permit:
        return self.admission.acquire(estimated_tokens)

    def close(self) -> None:
        """Refuse new requests from now on; queued ones continue."""
        self.admission.closing = True

    def add(self, items: Sequence[Formatted], deadline: float | None, now: float, permit: Permit) -> Request:
        """Queue a request's candidates under its permit, which now belongs to the request (released when
        it ends). Sizes the permit to the candidates' tokens first: on Overloaded the caller keeps it.
        A request admitted before `close` is still queued after it: draining finishes what was admitted."""
        if not items:
            raise ValueError("a request needs at least one candidate")
        permit.resize(sum(item.num_tokens for item in items))
        self._next_rid += 1
        request = Request(
            rid=self._next_rid,
            items=items,
            deadline=deadline,
            arrived=now,
            permit=permit,
            pending=deque(range(len(items))),
            scores=[None] * len(items),
            remaining=len(items),
            found_tokens=[0] * len(items),
        )
        self._requests[request.rid] = request
        self._queue.append(request)
        self.queued_candidate_tokens += permit.tokens
        return request

    # -- ending requests ---------------------------------------------------------------------------

    def _end(self, request: Request, scores: Scores | None = None, error: StepscoreError | None = None) -> Outcome:
        assert not request.done
        request.done = True
        if request.pending:
            self.dropped += 1
            self.queued_candidate_tokens -= sum(request.items[i].num_tokens for i in request.pending)
            request.pending.clear()
        del self._requests[request.rid]
        request.permit.release()
        return Outcome(request, scores, error)

    def cancel(self, rid: int, error: StepscoreError | None = None) -> Outcome | None:
        """End a request now (the caller gave up, or its own deadline fired). None if it already ended."""
        request = self._requests.get(rid)
        if request is None:
            return None
        return self._end(request, error=error or Cancelled("the caller gave up on the request"))

    def expire(self, now: float) -> list[Outcome]:
        """End every request whose deadline has passed."""
        late = [r for r in self._requests.values() if r.deadline is not None and now >= r.deadline]
        return [self._end(r, error=DeadlineExceeded("the deadline passed before the scores were computed")) for r in late]

    def fail_all(self, error: StepscoreError) -> list[Outcome]:
        """End every unfinished request with `error` (shutdown)."""
        return [self._end(r, error=error) for r in list(self._requests.values())]

    # -- batches -----------------------------------------------------------------------------------

    def next_wake(self, now: float, device_idle: bool) -> float | None:
        """When `plan` may next have something to do without new input: the oldest request's wait running
        out (an idle device), or the earliest deadline. None: only new input or a free device can."""
        times = [r.deadline for r in self._requests.values() if r.deadline is not None]
        head = self._head()
        if head is not None and device_idle:
            times.append(head.arrived + self.config.max_wait_s)
        return min(times) if times else None

    def _head(self) -> Request | None:
        while self._queue and (self._queue[0].done or not self._queue[0].pending):
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    def plan(self, now: float, device_idle: bool) -> Plan | None:
        """The next batch, or None when it should wait (see the module docstring). Call `expire` first."""
        head = self._head()
        if head is None:
            return None
        full = self.queued_candidate_tokens >= self.config.max_batch_tokens
        waited = now >= head.arrived + self.config.max_wait_s
        if not (full or (device_idle and waited)):
            return None
        return self._cut(now)

    def _cut(self, now: float) -> Plan:
        """Candidates in arrival order until the token budget is used (at least one)."""
        cfg = self.config
        counter = SharedTokenCounter(cfg.share_prefixes, cfg.min_shared_tokens)
        members: list[tuple[Request, int]] = []
        while (request := self._head()) is not None:
            while request.pending:
                item = request.items[request.pending[0]]
                if members and counter.total + counter.cost(item.ids) > cfg.max_batch_tokens:
                    return self._plan(members)
                counter.add(item.ids)
                members.append((request, request.pending.popleft()))
                self.queued_candidate_tokens -= item.num_tokens
                if request.first_batch_at is None:
                    request.first_batch_at = now
        return self._plan(members)

    def _plan(self, members: list[tuple[Request, int]]) -> Plan:
        self._next_plan += 1
        return Plan(self._next_plan, members)

    def requeue(self, plan: Plan, leftover: Sequence[int]) -> None:
        """Members (indices into `plan.members`) the packer could not fit go back to the front of the queue,
        in order; they leave the plan."""
        if not leftover:
            return
        back = [plan.members[k] for k in sorted(leftover)]
        drop = set(leftover)
        plan.members = [m for k, m in enumerate(plan.members) if k not in drop]
        front: list[Request] = []
        for request, index in reversed(back):
            if request.done:
                continue
            request.pending.appendleft(index)
            self.queued_candidate_tokens += request.items[index].num_tokens
            if request not in front:
                front.append(request)
        # `front` holds the requests from the last to the first: put them back so the first is the head
        for request in front:
            if request in self._queue:
                self._queue.remove(request)
            self._queue.appendleft(request)

    def complete(
        self,
        plan: Plan,
        scores: Sequence[npt.NDArray[np.float32]],
        elapsed_s: float,
        found_tokens: Sequence[int] | None = None,
    ) -> list[Outcome]:
        """Scores of a run (one array per plan member, in order), and per member the tokens the prefix cache
        answered beyond its match (Request.found_tokens). Returns the requests this finished."""
        outcomes: list[Outcome] = []
        charged: set[int] = set()
        found = found_tokens if found_tokens is not None else [0] * len(plan.members)
        for (request, index), values, extra in zip(plan.members, scores, found, strict=True):
            if request.done:  # cancelled, expired or failed while the batch ran: discard
                continue
            if request.rid not in charged:
                request.compute_s += elapsed_s
                charged.add(request.rid)
            if not np.isfinite(values).all():
                msg = f"the model produced NaN or inf for candidate {index}; no score returned"
                outcomes.append(self._end(request, error=ModelOutputError(msg)))
                continue
            request.scores[index] = values
            request.found_tokens[index] = extra
            request.remaining -= 1
            if request.remaining == 0:
                outcomes.append(self._end(request, scores=[s for s in request.scores if s is not None]))
        return outcomes

    def fail(self, plan: Plan, error: StepscoreError) -> list[Outcome]:
        """The run of `plan` failed: every request in it ends with `error`."""
        outcomes = []
        for request, _ in plan.members:
            if not request.done:
                outcomes.append(self._end(request, error=error))
        return outcomes

    # -- introspection -----------------------------------------------------------------------------

    @property
    def unfinished(self) -> int:
        return len(self._requests)

    def live(self, plan: Plan) -> bool:
        """Whether any request in `plan` still wants its scores."""
        return any(not request.done for request, _ in plan.members)
