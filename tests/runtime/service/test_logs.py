"""What an operator reads from `stepscore serve`: one INFO line at start-up (model, address, devices) and
one at shutdown, and an operator error as one line without a traceback. Live servers, the real command."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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
