"""Request-size limits, checked before any tokenization, and the guard that lets tokenization stop early.

A request's cost is decided by its sizes: how many candidates, how many steps each, how long the problem and
each step are. Every one of them is checked here in O(number of fields) — `len()` of strings and lists, no
copy and no tokenization — so a 15 MiB problem or a million candidates is refused in microseconds with
INVALID_ARGUMENT naming the field and the limit, instead of being tokenized first.

What passes is formatted in bounded chunks (`stepscore.runtime.formatting`): between chunks the formatter
calls a `WorkGuard`, which raises once the caller gave up or the deadline passed, so a large request stops
costing CPU soon after nobody waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from stepscore.errors import Cancelled, ConfigError, DeadlineExceeded, InvalidRequest


class HasIds(Protocol):
    """A candidate given as token ids (`stepscore.runtime.types.TokenIds`, or the wire message's view of one)."""

    @property
    def ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class RequestLimits:
    """The largest request the engine formats. Reported by `Info`; each has a flag (stepscore.runtime.flags)."""

    max_candidates: int = 1024  # candidates per request
    max_steps: int = 1024  # steps per candidate, its share of prefix_steps included
    max_problem_chars: int = 262_144  # 256 Ki characters: far beyond any context a PRM reads
    max_step_chars: int = 65_536  # characters per step (prefix steps too)
    # What the formatter builds: the problem and the prefix steps once per candidate (each candidate is
    # formatted whole) plus every candidate's own steps; a token id of a pre-tokenized candidate counts one.
    max_request_chars: int = 4_194_304

    def checked(self) -> RequestLimits:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_step_chars > self.max_request_chars or self.max_problem_chars > self.max_request_chars:
            raise ConfigError(
                f"max_request_chars {self.max_request_chars} is below max_problem_chars {self.max_problem_chars} or "
                f"max_step_chars {self.max_step_chars}: a request at those limits could never pass"
            )
        return self

    def check_count(self, candidates: int) -> None:
        """The candidate count alone: the service checks it on the wire message before converting anything."""
        if candidates > self.max_candidates:
            raise InvalidRequest(
                "candidates", f"{candidates} candidates; the limit is {self.max_candidates} per request (Info.max_candidates)"
            )

    def check(self, problem: str, prefix_steps: Sequence[str], candidates: Sequence[Sequence[str] | HasIds]) -> int:
        """Raise InvalidRequest naming the first field over its limit; return the request's size in characters
        (as `max_request_chars` counts them). Only lengths are read: the cost is O(number of strings)."""
        self.check_count(len(candidates))
        if not isinstance(problem, str):
            raise InvalidRequest("problem", "must be a string")
        if len(problem) > self.max_problem_chars:
            raise InvalidRequest(
                "problem",
                f"{len(problem)} characters; the limit is {self.max_problem_chars} (Info.max_problem_chars)",
            )
        shared = len(problem)
        for j, step in enumerate(prefix_steps):
            shared += self._step(f"prefix_steps[{j}]", step)
        total = 0
        for i, cand in enumerate(candidates):
            if isinstance(cand, str):
                raise InvalidRequest(f"candidates[{i}]", "must be a list of step strings")
            if not isinstance(cand, Sequence):
                ids = getattr(cand, "ids", None)
                if ids is None:
                    raise InvalidRequest(f"candidates[{i}]", "must be a list of step strings or token ids")
                total += len(ids)  # pre-tokenized: formatted as given, no problem text
            else:
                steps = len(prefix_steps) + len(cand)
                if steps > self.max_steps:
                    raise InvalidRequest(
                        f"candidates[{i}].steps",
                        f"{steps} steps (prefix steps included); the limit is {self.max_steps} per candidate "
                        "(Info.max_steps_per_candidate)",
                    )
                total += shared + sum(self._step(f"candidates[{i}].steps[{j}]", step) for j, step in enumerate(cand))
            if total > self.max_request_chars:
                break  # already over: no need to read the rest
        if total > self.max_request_chars:
            raise InvalidRequest(
                "request",
                f"over {self.max_request_chars} characters to format (the problem and prefix steps count once per "
                "candidate; a token id counts one); the limit is Info.max_request_chars",
            )
        return total

    def _step(self, where: str, step: str) -> int:
        if not isinstance(step, str):
            raise InvalidRequest(where, "must be a string")
        n = len(step)
        if n > self.max_step_chars:
            raise InvalidRequest(where, f"{n} characters; the limit is {self.max_step_chars} (Info.max_step_chars)")
        return n


class WorkGuard:
    """Lets work running on a worker thread notice that its caller gave up or that its deadline passed.

    `check()` is called between bounded chunks of work; `cancel()` from the event loop when the awaiting
    coroutine is cancelled. `clock` is the time source (`time.monotonic`, or a fake one in tests).
    """

    def __init__(self, deadline: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        self._clock = clock
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("the caller gave up while the request was being tokenized")
        if self.deadline is not None and self._clock() >= self.deadline:
            raise DeadlineExceeded("the deadline passed while the request was being tokenized")
