"""deploy/nginx/nginx.conf, run for real on loopback in front of three replicas of the embedded model: the
committed file with only its upstream servers and its port replaced. Skips (saying why) without nginx."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from stepscore.runtime.client import AsyncClient, Client
from stepscore.runtime.default_model import default_bundle
from stepscore.runtime.types import ScoreRequest
from tests.helpers.server import serve
from tests.runtime.service.test_replicas import HEAVY, HEAVY_LIMIT, _queued_tokens

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy/nginx/nginx.conf"
NGINX = shutil.which("nginx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_conf(targets: list[str], port: int) -> str:
    """The committed configuration with the upstream's servers and the listening port replaced."""
    text = CONF.read_text()
    servers = "".join(f"        server {t} max_fails=1 fail_timeout=5s;\n" for t in targets)
    text, n = re.subn(r"^ *server stepscore-headless:50051[^\n]*\n", servers, text, flags=re.M)
    assert n == 1, "deploy/nginx/nginx.conf: the upstream's server line changed; update this test"
    text, n = re.subn(r"listen 8080 http2;", f"listen 127.0.0.1:{port} http2;", text)
    assert n == 1
    return text.replace("worker_processes auto;", "worker_processes 1;")


def test_the_config_hashes_the_search_header_on_a_ring() -> None:
    text = CONF.read_text()
    assert "hash $http_x_stepscore_search_id consistent;" in text
    assert "grpc_pass grpc://stepscore;" in text and "/stepscore.v1.StepScorer/" in text


@contextmanager
def nginx_in_front(targets: list[str], root: Path) -> Iterator[str]:
    """nginx with the committed configuration in front of `targets`; yields its address once health passes."""
    if NGINX is None:
        pytest.skip("no nginx binary (.ci/setup installs Debian's nginx-light when run as root with apt)")
    port = _free_port()
    (root / "nginx.conf").write_text(local_conf(targets, port))
    check = subprocess.run(
        [NGINX, "-t", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "stderr"], capture_output=True, text=True
    )
    if check.returncode != 0 and "unknown directive" in check.stderr:
        pytest.skip(f"this nginx lacks a module the config needs: {check.stderr.strip()}")
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=30)  # the health check, through nginx
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if NGINX is None:
        pytest.skip("no nginx binary (.ci/setup installs Debian's nginx-light when run as root with apt)")
    with ExitStack() as stack:
        servers = [stack.enter_context(serve(default_bundle(), "--replica-id", f"r{i}")) for i in range(3)]
        yield stack.enter_context(nginx_in_front([s.target for s in servers], tmp_path_factory.mktemp("nginx")))


def test_searches_stick_to_one_replica_and_spread_through_nginx(proxied: str) -> None:
    seen: dict[str, set[str]] = defaultdict(set)
    with Client(proxied) as client:  # one address: the client does no balancing of its own
        for call in range(3):
            for k in range(24):
                result = client.score(f"What is {k} + 1?", [[f"{k} + 1 = {k + 1}.", f"Call {call}."]], search_id=f"s{k}")
                assert result.candidates[0].step_scores
                seen[f"s{k}"].add(result.replica)
        assert all(len(where) == 1 for where in seen.values()), seen
        assert set().union(*seen.values()) == {"r0", "r1", "r2"}
        # no header: an empty key, which nginx balances round-robin
        assert len({client.score("What is 1 + 1?", [["1 + 1 = 2."]]).replica for _ in range(9)}) > 1


def test_a_stream_passes_through_nginx(proxied: str) -> None:
    async def run() -> list[str]:
        async with AsyncClient(proxied) as client:
            requests = [ScoreRequest(f"What is {k} + 1?", [[f"{k} + 1 = {k + 1}."]], request_id=f"q{k}") for k in range(20)]
            items = [item async for item in client.score_stream(requests, search_id="s3")]
        assert all(item.result is not None for item in items), [item.error for item in items]
        assert sorted(item.request_id for item in items) == sorted(f"q{k}" for k in range(20))
        return [item.result.replica for item in items if item.result]

    replicas = asyncio.run(run())
    assert len(set(replicas)) == 1 and replicas[0] in {"r0", "r1", "r2"}


def test_a_replica_killed_behind_nginx_costs_a_client_retry(tmp_path: Path) -> None:
    if NGINX is None:
        pytest.skip("no nginx binary (.ci/setup installs Debian's nginx-light when run as root with apt)")
    with ExitStack() as stack:
        ports = [_free_port() for _ in range(3)]
        servers = [
            stack.enter_context(serve(default_bundle(), "--replica-id", f"r{i}", "--metrics-port", str(ports[i]), *HEAVY_LIMIT))
            for i in range(3)
        ]
        address = stack.enter_context(nginx_in_front([s.target for s in servers], tmp_path))
        with Client(address, timeout=60, retry=True) as client, ThreadPoolExecutor(1) as pool:
            home = client.score("(1+2)*2", [["1+2=3"]], search_id="s0").replica
            victim = int(home[1:])
            heavy = pool.submit(client.score, "(1+2)*2", HEAVY, search_id="s0")
            # killed once the heavy call is in the victim's queue (its gauge), so nginx has streamed it there
            while _queued_tokens(ports[victim]) < 10_000 and not heavy.done():
                threading.Event().wait(0.005)
            assert not heavy.done(), "the heavy call finished before the kill: make it heavier"
            servers[victim].stop(signal.SIGKILL)
            moved = heavy.result()  # nginx answered 502 (UNAVAILABLE); the client's retry went to another replica
            assert len(moved.candidates) == len(HEAVY) and moved.replica != home
            after = {client.score("(1+2)*2", [["1+2=3"]], search_id="s0").replica for _ in range(3)}
            assert len(after) == 1 and home not in after
