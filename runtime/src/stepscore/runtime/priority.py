"""Compute threads at a lower CPU priority than the thread that answers calls (`--compute-nice`, off by default).

A server's event loop does little work per call, but every call waits for it: when onnxruntime's threads,
the tokenizer and the batch packing keep every core busy, the loop waits for a core at each wake-up, and a
refusal under overload, well under a millisecond of work, took up to 5-7.5 ms (p99, server side) on 2 cores.
With the compute threads at niceness 10 the kernel hands the loop a core as soon as it wakes: p99 <= 2-3 ms
(docs/reliability.md, the storm).

Niceness is not scoped to the process: lowered compute yields to every other busy process on the host as
well. In a container (its own CPU cgroup) or on a dedicated host that costs nothing; on a host shared with
other busy processes the model gets a fraction of the cores (with it on by default, the test suite beside
two `yes` processes had done a third of its tests when a whole run usually ends). Hence off by default.

Threads inherit their creator's niceness, so the engine lowers its own worker threads when they start and
creates its onnxruntime sessions (whose thread pools start with them) from a lowered thread. Niceness is a
per-thread property on Linux only; elsewhere `os.setpriority` would change the whole process (the event loop
included), so nothing is done there.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

MAX_NICE = 19  # the kernel's lowest priority


def supported() -> bool:
    """Whether threads can be lowered one by one (Linux)."""
    return sys.platform == "linux"


def lower_current_thread(nice: int) -> None:
    """Run the calling thread (and the threads it starts from now on) at niceness `nice` at least; 0: leave it.
    Raising a thread's priority needs privileges, lowering never does: a thread already lower stays so."""
    if nice <= 0 or not supported():
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, MAX_NICE))
    except OSError as exc:
        # a sandbox may forbid it (seccomp): the thread runs at the process's niceness, and must still run: a pool
        # whose initializer raises refuses every task
        log.warning("could not lower a compute thread to niceness %d (%s): it runs at the process's own", nice, exc)


def pool(workers: int, name: str, nice: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose threads run at niceness `nice` (`name`: their name prefix)."""
    return concurrent.futures.ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_current_thread, initargs=(nice,)
    )


def call_lowered(nice: int, fn: Callable[[], T]) -> T:
    """`fn()` run on a new thread at niceness `nice`, so that the threads it starts inherit that niceness (an
    onnxruntime session starts its thread pool when it is created); its result returned, its exception raised."""
    if nice <= 0 or not supported():
        return fn()
    with pool(1, "stepscore-start", nice) as one:
        return one.submit(fn).result()
