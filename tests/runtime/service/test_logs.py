"""What an operator reads from `stepscore serve`: one INFO line at start-up (model, address, devices) and
one at shutdown, and an operator error as one line without a traceback. Live servers, the real command."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stepscore.runtime import allocator
from tests.helpers.server import serve


def test_startup_and_shutdown_are_one_info_line_each(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("trl")
    with serve(bundle) as s:  # no --log-level: the default shows INFO
        started = [line for line in s.output if re.search(r" (INFO|WARNING|ERROR) ", line)]
        assert len(started) == 1, s.output
        line = started[0]
        assert " INFO " in line and f"on grpc://127.0.0.1:{s.port}" in line and "devices cpu" in line
        assert "(trl, fp32)" in line  # the model's preset and precision
        assert s.stop() == 0
    logged = [line for line in s.output if re.search(r" (INFO|WARNING|ERROR) ", line)]
    assert len(logged) == 2 and " INFO " in logged[1] and "shutting down" in logged[1]


JEMALLOC = allocator.find_jemalloc()
GLIBC_TUNED = f"allocator glibc (mmap threshold {allocator.MMAP_THRESHOLD // 1024} KiB)"


def _maps_jemalloc(pid: int) -> bool:
    return "/libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(sys.platform != "linux" or allocator.malloc_trim() is None, reason="the allocator choice is glibc Linux's")
@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="this process's LD_PRELOAD would be the server's too")
def test_the_server_runs_on_jemalloc_where_installed_and_says_so(tiny_bundle: Callable[..., Path]) -> None:
    bundle = tiny_bundle("trl")
    with serve(bundle) as s:  # the default, --allocator auto
        started = [line for line in s.output if " INFO " in line]
        on_jemalloc = _maps_jemalloc(s.proc.pid)  # the same PID: the server re-executed itself in place
    if JEMALLOC is None:
        assert started[0].rstrip().endswith(f"; {GLIBC_TUNED}") and not on_jemalloc, started
    else:
        assert started[0].rstrip().endswith("; allocator jemalloc (preloaded by the server)"), started
        assert on_jemalloc
    with serve(bundle, "--allocator", "glibc") as s:
        started = [line for line in s.output if " INFO " in line]
        assert started[0].rstrip().endswith(f"; {GLIBC_TUNED}") and not _maps_jemalloc(s.proc.pid), started


@pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed here (apt-get install libjemalloc2)")
@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="this process's LD_PRELOAD would be the server's too")
def test_a_malloc_the_environment_preloads_is_kept(tiny_bundle: Callable[..., Path]) -> None:
    assert JEMALLOC is not None
    with serve(tiny_bundle("trl"), "--allocator", "jemalloc", env={"LD_PRELOAD": JEMALLOC}) as s:
        started = [line for line in s.output if " INFO " in line]
        assert started[0].rstrip().endswith("; allocator jemalloc (preloaded by the environment)"), started
        assert _maps_jemalloc(s.proc.pid)


@pytest.mark.skipif(JEMALLOC is not None, reason="jemalloc is installed here: the refusal shows only where it is not")
def test_allocator_jemalloc_without_jemalloc_refuses_to_start(tiny_bundle: Callable[..., Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", str(tiny_bundle("trl")), "--port", "0", "--allocator", "jemalloc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "stepscore serve: error: --allocator jemalloc: jemalloc is not installed here (apt-get install libjemalloc2 "
        "(Debian, Ubuntu))"
    ]


def test_a_taken_metrics_port_is_one_line(tiny_bundle: Callable[..., Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "stepscore.cli",
                "serve",
                str(tiny_bundle("trl")),
                "--port",
                "0",
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    # before: the error line, then an event-loop traceback from the gRPC server left running
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"stepscore serve: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]
