"""The scheduling core, driven with a fake clock: admission, FIFO batches under the token budget, waiting,
deadlines, cancellation, failures; and property tests over random interleavings of all of them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepscore.errors import Cancelled, DeadlineExceeded, InternalError, ModelOutputError, Overloaded, Unavailable
from stepscore.runtime.core import CoreConfig, Outcome, Plan, Request, SchedulingCore
from stepscore.runtime.packing import SharedTokenCounter
from stepscore.runtime.types import Formatted


def item(n: int, first: int = 1) -> Formatted:
    """A candidate of n tokens whose ids start at `first` (distinct firsts share no prefix)."""
    ids = np.arange(first, first + n, dtype=np.int32)
    return Formatted(ids, np.array([n - 1], np.int32))


def config(**overrides: object) -> CoreConfig:
    base: dict[str, object] = dict(
        max_batch_tokens=100,
        max_wait_s=0.01,
        share_prefixes=False,
        min_shared_tokens=1,
        max_queued_requests=100,
        max_queued_tokens=10_000,
    )
    base.update(overrides)
    return CoreConfig(**base)  # type: ignore[arg-type]


def add(core: SchedulingCore, sizes: list[int], now: float = 0.0, deadline: float | None = None) -> Request:
    items = [item(n, first=1000 * k + 1) for k, n in enumerate(sizes)]
    permit = core.admit(sum(sizes))
    return core.add(items, deadline, now, permit)


def run(core: SchedulingCore, plan: Plan, value: float = 0.5) -> list[Outcome]:
    return core.complete(plan, [np.full(1, value, np.float32) for _ in plan.members], 0.001)


def test_waits_for_the_batch_to_fill_then_cuts_after_max_wait() -> None:
    core = SchedulingCore(config())
    add(core, [30], now=0.0)
    assert core.plan(0.005, device_idle=True) is None  # not full, not waited long enough
    assert core.next_wake(0.005, device_idle=True) == pytest.approx(0.01)
    plan = core.plan(0.01, device_idle=True)
    assert plan is not None and len(plan.members) == 1


def test_busy_devices_wait_for_a_full_budget() -> None:
    core = SchedulingCore(config())
    add(core, [60], now=0.0)
    assert core.plan(1.0, device_idle=False) is None  # waited, but no device is free and the budget is not full
    assert core.next_wake(1.0, device_idle=False) is None  # only new input or a free device changes that
    add(core, [50], now=1.0)
    plan = core.plan(1.0, device_idle=False)
    assert plan is not None and [len(r.items[i].ids) for r, i in plan.members] == [60]  # 60 + 50 > 100


def test_batches_are_fifo_within_the_budget_and_a_long_request_is_not_starved() -> None:
    core = SchedulingCore(config())
    long = add(core, [40] * 5, now=0.0)  # 200 tokens: three batches
    for k in range(10):  # a stream of short requests behind it
        add(core, [10], now=0.001 * k)
    first = core.plan(1.0, device_idle=True)
    assert first is not None and all(r is long for r, _ in first.members)
    assert sum(len(r.items[i].ids) for r, i in first.members) <= 100
    run(core, first)
    second = core.plan(1.0, device_idle=True)
    assert second is not None and [r is long for r, _ in second.members][:2] == [True, True]
    done = run(core, second)
    third = core.plan(1.0, device_idle=True)
    assert third is not None and third.members[0][0] is long
    done += run(core, third)
    assert any(o.request is long and o.scores is not None and len(o.scores) == 5 for o in done)


def test_shared_prefixes_count_once_against_the_budget() -> None:
    core = SchedulingCore(config(share_prefixes=True))
    shared = [item(60, first=1), item(60, first=1)]  # identical candidates: 60 tokens once shared
    core.add(shared, None, 0.0, core.admit(120))
    plan = core.plan(1.0, device_idle=True)
    assert plan is not None and len(plan.members) == 2


def test_requeued_leftovers_go_back_to_the_front_in_order() -> None:
    core = SchedulingCore(config())
    a = add(core, [10, 10, 10], now=0.0)
    b = add(core, [10], now=0.0)
    plan = core.plan(1.0, device_idle=True)
    assert plan is not None and len(plan.members) == 4
    core.requeue(plan, [1, 3])  # the packer fit a[0], a[2]
    assert [(r is a, i) for r, i in plan.members] == [(True, 0), (True, 2)]
    again = core.plan(1.0, device_idle=True)
    assert again is not None and [(r is a, i) for r, i in again.members] == [(True, 1), (False, 0)]
    assert again.members[1][0] is b


def test_deadline_drops_queued_work_before_compute() -> None:
    core = SchedulingCore(config())
    busy = add(core, [100], now=0.0)
    late = add(core, [20], now=0.0, deadline=0.5)
    plan = core.plan(0.0, device_idle=True)
    assert plan is not None and [r for r, _ in plan.members] == [busy]
    assert core.next_wake(0.1, device_idle=False) == 0.5
    expired = core.expire(0.5)
    assert [o.request for o in expired] == [late] and isinstance(expired[0].error, DeadlineExceeded)
    assert core.queued_candidate_tokens == 0 and core.dropped == 1
    run(core, plan)
    assert core.plan(1.0, device_idle=True) is None  # the expired request never reaches a batch
    assert core.admission.requests == 0 and core.admission.tokens == 0


def test_cancel_queued_and_in_flight() -> None:
    core = SchedulingCore(config())
    flying = add(core, [50], now=0.0)
    queued = add(core, [80], now=0.0)
    plan = core.plan(1.0, device_idle=True)
    assert plan is not None and [r for r, _ in plan.members] == [flying]
    out = core.cancel(queued.rid)
    assert out is not None and isinstance(out.error, Cancelled)
    out = core.cancel(flying.rid)
    assert out is not None and isinstance(out.error, Cancelled)
    assert core.cancel(flying.rid) is None  # ends once
    assert not core.live(plan)
    assert run(core, plan) == []  # scores of a cancelled request are discarded
    assert core.plan(2.0, device_idle=True) is None
    assert core.admission.requests == 0 and core.admission.tokens == 0


def test_nan_scores_and_failed_runs_end_their_requests_with_an_error() -> None:
    core = SchedulingCore(config())
    a = add(core, [10], now=0.0)
    b = add(core, [10], now=0.0)
    plan = core.plan(1.0, device_idle=True)
    assert plan is not None
    out = core.complete(plan, [np.array([np.nan], np.float32), np.array([0.5], np.float32)], 0.001)
    assert isinstance(out[0].error, ModelOutputError) and out[0].request is a
    assert out[1].request is b and out[1].scores is not None
    c = add(core, [10], now=2.0)
    plan = core.plan(3.0, device_idle=True)
    assert plan is not None
    failed = core.fail(plan, InternalError("abc"))
    assert [o.request for o in failed] == [c] and isinstance(failed[0].error, InternalError)


def test_admission_permit_sizes_refusals_and_single_release() -> None:
    core = SchedulingCore(config(max_queued_requests=2, max_queued_tokens=100))
    p1 = core.admit(60)
    with pytest.raises(Overloaded, match="tokens"):
        core.admit(50)  # 60 + 50 > 100
    p2 = core.admit(40)
    with pytest.raises(Overloaded, match="requests"):
        core.admit(1)
    with pytest.raises(Overloaded):
        p2.resize(41)  # the real size does not fit; the permit keeps its old size
    assert core.admission.tokens == 100
    p2.resize(10)
    assert core.admission.tokens == 70
    assert p2.release() and not p2.release()  # released once, whatever calls it again
    assert (core.admission.requests, core.admission.tokens) == (1, 60)
    p1.release()
    alone = core.admit(5000)  # a request alone is admitted whatever its size
    alone.release()
    core.close()
    with pytest.raises(Unavailable):
        core.admit(1)
    assert (core.admission.requests, core.admission.tokens) == (0, 0)


def test_shutdown_fails_everything_unfinished() -> None:
    core = SchedulingCore(config())
    reqs = [add(core, [30]) for _ in range(3)]
    plan = core.plan(1.0, device_idle=True)
    assert plan is not None
    out = core.fail_all(Unavailable("shutting down"))
    assert {o.request.rid for o in out} == {r.rid for r in reqs}
    assert core.unfinished == 0 and core.admission.requests == 0


# -- property tests --------------------------------------------------------------------------------


@dataclass
class World:
    """A model of the callers: which requests are admitted and how each ended."""

    core: SchedulingCore
    now: float = 0.0
    admitted: set[int] = field(default_factory=set)
    ended: dict[int, int] = field(default_factory=dict)  # rid -> number of outcomes seen
    plans: list[Plan] = field(default_factory=list)

    def record(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            assert (o.scores is None) != (o.error is None)
            self.ended[o.request.rid] = self.ended.get(o.request.rid, 0) + 1
            if o.scores is not None:
                assert len(o.scores) == len(o.request.items)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(1, 150), min_size=1, max_size=4), st.none() | st.floats(0, 2)),
        st.tuples(st.just("tick"), st.floats(0, 0.5), st.booleans()),
        st.tuples(st.just("run"), st.integers(0, 3), st.sampled_from(["ok", "nan", "fail"])),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("requeue"), st.integers(0, 3), st.integers(0, 7)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, share=st.booleans(), budget=st.integers(50, 400))
def test_every_request_ends_exactly_once_and_budgets_hold(
    ops: list[tuple[object, object, object]], share: bool, budget: int
) -> None:
    core = SchedulingCore(config(max_batch_tokens=budget, share_prefixes=share, max_queued_requests=8, max_queued_tokens=900))
    w = World(core)
    rid_order: list[int] = []
    for op, a, b in ops:
        if op == "add":
            assert isinstance(a, list)
            try:
                permit = core.admit(sum(a))
            except Overloaded:
                continue
            items = [item(n, first=1 + (k % 2) * 500) for k, n in enumerate(a)]  # some share prefixes
            deadline = None if b is None else w.now + float(b)  # type: ignore[arg-type]
            try:
                request = core.add(items, deadline, w.now, permit)
            except Overloaded:
                permit.release()
                continue
            w.admitted.add(request.rid)
            rid_order.append(request.rid)
        elif op == "tick":
            w.now += float(a)  # type: ignore[arg-type]
            w.record(core.expire(w.now))
            plan = core.plan(w.now, device_idle=bool(b))
            if plan is not None:
                members = plan.items
                counter = SharedTokenCounter(share, 1)
                for it in members:
                    counter.add(it.ids)
                # the budget holds, except for a single candidate larger than it
                assert counter.total <= budget or len(members) == 1
                w.plans.append(plan)
        elif op == "run" and w.plans:
            plan = w.plans.pop(int(a) % len(w.plans))  # type: ignore[call-overload]
            if b == "fail":
                w.record(core.fail(plan, InternalError("x")))
            else:
                value = np.nan if b == "nan" else 0.5
                w.record(core.complete(plan, [np.full(1, value, np.float32) for _ in plan.members], 0.001))
        elif op == "cancel" and rid_order:
            rid = rid_order[int(a) % len(rid_order)]  # type: ignore[call-overload]
            out = core.cancel(rid)
            w.record([] if out is None else [out])
        elif op == "requeue" and w.plans:
            plan = w.plans[int(a) % len(w.plans)]  # type: ignore[call-overload]
            k = int(b) % max(1, len(plan.members))  # type: ignore[call-overload]
            if len(plan.members) > 1:
                core.requeue(plan, [k])
    # drain: run everything planned and everything still queued
    for _ in range(1000):
        for plan in w.plans:
            w.record(core.complete(plan, [np.full(1, 0.5, np.float32) for _ in plan.members], 0.001))
        w.plans.clear()
        w.now += 1.0
        w.record(core.expire(w.now))
        plan = core.plan(w.now, device_idle=True)
        if plan is None:
            break
        w.plans.append(plan)
    assert core.unfinished == 0
    assert set(w.ended) == w.admitted and all(n == 1 for n in w.ended.values())
    assert core.admission.requests == 0 and core.admission.tokens == 0
    assert core.queued_candidate_tokens == 0
