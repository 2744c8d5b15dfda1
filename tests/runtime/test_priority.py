"""Compute threads at a lower CPU priority (stepscore.runtime.priority)."""

from __future__ import annotations

import os
import threading

import pytest

from stepscore.runtime import priority

pytestmark = pytest.mark.skipif(not priority.supported(), reason="niceness is per thread on Linux only")


def _nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def _run_in_thread(fn: object) -> None:
    t = threading.Thread(target=fn)  # type: ignore[arg-type]
    t.start()
    t.join()


def test_lowering_changes_only_the_calling_thread_and_never_raises_priority() -> None:
    base = _nice_of(threading.get_native_id())
    seen: list[int] = []

    def lowered() -> None:
        tid = threading.get_native_id()
        priority.lower_current_thread(base + 3)
        seen.append(_nice_of(tid))
        priority.lower_current_thread(base + 1)  # asks for less: a thread already lower stays so
        seen.append(_nice_of(tid))
        priority.lower_current_thread(0)  # 0: leave it
        seen.append(_nice_of(tid))

    _run_in_thread(lowered)
    assert seen == [base + 3, base + 3, base + 3]
    assert _nice_of(threading.get_native_id()) == base


def test_pool_threads_run_lowered() -> None:
    base = _nice_of(threading.get_native_id())
    with priority.pool(2, "test-lowered", base + 4) as pool:
        got = {pool.submit(lambda: (threading.current_thread().name, _nice_of(threading.get_native_id()))).result()}
    assert all(name.startswith("test-lowered") and nice == base + 4 for name, nice in got)


def test_threads_started_by_a_lowered_call_inherit_its_niceness_and_errors_pass_through() -> None:
    base = _nice_of(threading.get_native_id())
    children: list[int] = []

    def starts_a_thread() -> str:
        # as an onnxruntime session starts its pool: a native thread created inside the call
        _run_in_thread(lambda: children.append(_nice_of(threading.get_native_id())))
        return "made"

    assert priority.call_lowered(base + 2, starts_a_thread) == "made"
    assert children == [base + 2]
    assert _nice_of(threading.get_native_id()) == base

    def fails() -> None:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        priority.call_lowered(base + 2, fails)


def test_a_thread_that_may_not_be_lowered_still_runs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def forbidden(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", forbidden)
    base = _nice_of(threading.get_native_id())
    with priority.pool(1, "test-forbidden", base + 4) as pool:
        assert pool.submit(lambda: _nice_of(threading.get_native_id())).result() == base
    assert "could not lower a compute thread" in caplog.text
