"""Run `stepscore serve` as a real process for the service tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    host: str
    port: int
    output: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None  # reads `output` until the process closes it

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server, wait for it to exit, and for its last output lines to be in `output`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        if self.pump is not None:
            self.pump.join(timeout=timeout)
        return code


def _pump(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line)


@contextmanager
def serve(bundle: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[ServerProcess]:
    """Start a server on a free port; yields once it prints its ready line; SIGTERMs it on exit."""
    cmd = [sys.executable, "-m", "stepscore.cli", "serve", str(bundle), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    port = 0
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{''.join(lines)}")
            continue
        lines.append(line)
        if "ready on" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    if not port:
        proc.kill()
        raise RuntimeError(f"server did not become ready:\n{''.join(lines)}")
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    server = ServerProcess(proc, "127.0.0.1", port, lines, pump)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def metric_samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of Prometheus metric `name` on a live server's metrics port: (labels, value)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = []
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if match is not None and match.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            out.append((labels, float(match.group(3))))
    return out


def read_metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of metric `name` whose labels include `labels` (0.0 when there are none)."""
    return sum(value for got, value in metric_samples(port, name) if all(got.get(k) == v for k, v in labels.items()))
