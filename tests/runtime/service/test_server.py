"""The service's promises, each checked against a real `stepscore serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepscore.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unauthenticated, Unavailable
from stepscore.runtime.client import AsyncClient, Client
from stepscore.runtime.types import ScoreRequest, TokenIds
from stepscore.v1 import stepscore_pb2 as pb
from stepscore.v1 import stepscore_pb2_grpc as pb_grpc
from tests.helpers.bundles import exported_bundle
from tests.helpers.server import ServerProcess, serve

PROBLEM = "What is (2+3)*4?"
GOOD = ["2+3=5.", "5*4=20.", "The answer is 20."]


def _heavy(n: int = 120, steps: int = 8) -> list[list[str]]:
    """A request that keeps a CPU busy for a while (many candidates, nothing shared): 600 of them take
    about 3 s on the slow bundle, so a test can act while it runs."""
    return [[f"candidate {k} step {i}: {k * 31 + i} plus {i} is {k * 31 + 2 * i}." for i in range(steps)] for k in range(n)]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Callable[..., Path]) -> Path:
    return tiny_bundle("qwen-prm")


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wider tiny model (hidden 256): heavy requests take seconds, so tests can act while one runs."""
    from tests.helpers.tiny_models import build

    return exported_bundle("qwen-prm-hidden256", tmp_path_factory.mktemp("slow"), lambda d: build("qwen-prm", d, hidden=256))


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[ServerProcess]:
    with serve(bundle, "--reflection", "--max-receive-message-bytes", "65536") as s:
        yield s


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _wait_metric(port: int, name: str, timeout: float = 300.0) -> None:
    """Return once the live server's metric `name` is at least 1 (each check is one scrape)."""
    deadline = time.monotonic() + timeout
    while _metric(port, name) < 1:
        assert time.monotonic() < deadline, f"{name} stayed at 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unary_info_and_health(server: ServerProcess) -> None:
    with Client(server.target) as client:
        client.wait_ready()
        result = client.score(PROBLEM, [GOOD, GOOD[:1]], aggregates=["min", "soft_min"], request_id="r1")
        assert result.request_id == "r1"
        assert [len(c.step_scores) for c in result.candidates] == [3, 1]
        assert set(result.candidates[0].aggregates) == {"min", "soft_min"}
        assert result.timing.total_ms >= result.timing.compute_ms > 0
        no_steps = client.score(PROBLEM, [GOOD], return_step_scores=False, aggregates=["last"])
        assert no_steps.candidates[0].step_scores == [] and "last" in no_steps.candidates[0].aggregates
        shaped = client.score(PROBLEM, [["5*4=20."], ["5*4=21."]], prefix_steps=GOOD[:1])
        assert [len(c.step_scores) for c in shaped.candidates] == [2, 2]
        assert shaped.candidates[0].step_scores[0] == pytest.approx(shaped.candidates[1].step_scores[0])
        info = client.info()
        assert info["family"] == "token_cls" and info["preset"] == "qwen-prm" and info["max_seq_len"] > 0
        assert "soft_min" in info["aggregates"] and info["manifest"]["format"]["step"]
    channel = grpc.insecure_channel(server.target)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="stepscore.v1.StepScorer"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_stream_answers_out_of_order(slow_bundle: Path) -> None:
    async def run(target: str) -> list[str]:
        async with AsyncClient(target) as client:
            requests = [ScoreRequest(PROBLEM, _heavy(600), request_id="slow")]
            requests += [ScoreRequest(PROBLEM, [GOOD], request_id=f"fast{i}") for i in range(5)]
            requests += [ScoreRequest(PROBLEM, [["word " * 400]], request_id="bad")]  # over the context
            order = []
            async for item in client.score_stream(requests):
                order.append(item.request_id)
                if item.request_id == "bad":
                    assert isinstance(item.error, InvalidRequest) and item.error.field == "candidates[0]"
                else:
                    assert item.result is not None and item.result.request_id == item.request_id
            return order

    # small batches: the slow request spans many engine runs, and the fast ones get in between
    with serve(slow_bundle, "--max-batch-tokens", "2048", "--row-tokens", "512") as server:
        order = asyncio.run(run(server.target))
    assert sorted(order) == sorted(["slow", "bad", *[f"fast{i}" for i in range(5)]])  # each exactly once
    assert order[-1] == "slow"  # the slow request held up nobody


@pytest.mark.parametrize(
    ("candidates", "extra", "field"),
    [
        ([], {}, "candidates"),
        ([GOOD], {"aggregates": ["median"]}, "aggregates"),
        ([TokenIds([1, 2, 10**9], [2])], {}, "candidates[0].ids[2]"),
        ([["word " * 400]], {}, "candidates[0]"),  # over the 512-token context, no truncation
    ],
)
def test_invalid_input_names_the_field(server: ServerProcess, candidates: list[Any], extra: dict[str, Any], field: str) -> None:
    with Client(server.target) as client, pytest.raises(InvalidRequest) as info:
        client.score(PROBLEM, candidates, **extra)
    # the unary error carries the field as the stream's errors do (trailing metadata `stepscore-field`)
    assert info.value.field == field
    assert not info.value.message.startswith(field + ":")


def test_unary_error_trailer_names_the_field_for_any_client(server: ServerProcess) -> None:
    """Clients in other languages read the field from the trailing metadata, not from the message text."""
    channel = grpc.insecure_channel(server.target)
    stub: Any = pb_grpc.StepScorerStub  # generated code, untyped
    steps = pb.Candidate(steps=pb.Steps(steps=GOOD))
    request = pb.ScoreRequest(problem=PROBLEM, candidates=[steps], aggregates=["median"])
    with pytest.raises(grpc.RpcError) as info:
        stub(channel).Score(request, timeout=30)
    channel.close()
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.trailing_metadata())["stepscore-field"] == "aggregates"


def test_empty_steps_are_scored_as_the_reference_does(server: ServerProcess) -> None:
    # the reference code of every family tags an empty step like any other (two tags in a row): a refusal
    # would make clients drop it and shift step indices against their labels
    with Client(server.target) as client:
        result = client.score(PROBLEM, [["fine", "", "  ", "done"]], prefix_steps=[""])
    assert len(result.candidates[0].step_scores) == 5  # the prefix step is scored too


def test_left_truncation_over_grpc(server: ServerProcess) -> None:
    steps = [f"step {i} adds {i}." for i in range(60)]
    with Client(server.target) as client:
        result = client.score(PROBLEM, [steps], truncate_left=True)
    cand = result.candidates[0]
    assert cand.num_truncated_steps > 0 and len(cand.step_scores) == 60 - cand.num_truncated_steps
    assert cand.num_tokens <= 512


def _sized(size: int) -> bytes:
    """A ScoreRequest serialized to exactly `size` bytes."""
    msg = pb.ScoreRequest(problem="", candidates=[pb.Candidate(steps=pb.Steps(steps=["a"]))])
    pad = size - msg.ByteSize()
    msg.problem = "x" * pad
    while msg.ByteSize() > size:  # the length prefix grew with the problem
        msg.problem = msg.problem[:-1]
    data = msg.SerializeToString()
    assert len(data) == size
    return data


def test_message_size_limit_and_bad_bytes(server: ServerProcess) -> None:
    channel = grpc.insecure_channel(server.target)
    raw = channel.unary_unary("/stepscore.v1.StepScorer/Score")  # bytes in, bytes out
    # the advertised limit (65536 here) is the limit: one byte over is refused by gRPC before it is read
    # (it used to be accepted up to twice the limit, parsed, and only then refused)
    for size in (65_537, 100_000, 131_000):
        with pytest.raises(grpc.RpcError) as err:
            raw(_sized(size))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, size
        assert f"({size} vs. 65536)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # at the limit: read, then refused for its content only
        raw(_sized(65_536))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens long" in err.value.details()
    bad_utf8 = b"\x12\x03\xff\xfe\xfd"  # field 2 (problem) holding invalid UTF-8
    with pytest.raises(grpc.RpcError) as err:
        raw(bad_utf8)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()
    channel.close()
    with Client(server.target) as client:  # still serving
        assert client.score(PROBLEM, [GOOD]).candidates


def test_reflection_lists_the_service(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(server.target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    channel.close()
    assert "stepscore.v1.StepScorer" in names and "grpc.health.v1.Health" in names


def test_overload_is_immediate_and_admission_is_atomic(slow_bundle: Path) -> None:
    with serve(slow_bundle, "--max-queued-requests", "3", "--max-batch-tokens", "2048", "--row-tokens", "512") as s:

        def call(_: int) -> tuple[str, float]:
            started = time.perf_counter()
            with Client(s.target) as client:
                try:
                    client.score(PROBLEM, _heavy(60))
                    return "ok", time.perf_counter() - started
                except Overloaded:
                    return "overloaded", time.perf_counter() - started

        with Client(s.target) as warm:
            warm.wait_ready()
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(call, range(16)))
    ok = [t for o, t in outcomes if o == "ok"]
    refused = [t for o, t in outcomes if o == "overloaded"]
    assert 1 <= len(ok) <= 3 + 1  # the cap, plus at most one that slipped in after an answer freed a slot
    assert len(refused) >= 12
    assert max(refused) < min(ok)  # refusals come at once, long before any heavy answer


def test_deadline_is_deadline_exceeded_and_counted(slow_bundle: Path) -> None:
    """Over the wire: a call whose deadline passes while it waits behind heavy work gets DEADLINE_EXCEEDED
    and the metrics count it. (That expired and cancelled work never reaches the model is proven where the
    device can be held: tests/runtime/test_engine.py and tests/runtime/test_core.py.)"""
    metrics_port = _free_port()
    with serve(slow_bundle, "--metrics-port", str(metrics_port), "--max-wait-ms", "0") as s:
        with Client(s.target) as client:
            client.wait_ready()

        async def run() -> None:
            async with AsyncClient(s.target) as client:
                busy = asyncio.create_task(client.score(PROBLEM, _heavy(600)))
                # once its first batch ran, the rest of the heavy request is queued ahead of the next call
                await asyncio.get_running_loop().run_in_executor(None, _wait_metric, metrics_port, "stepscore_batches_total")
                with pytest.raises(DeadlineExceeded):
                    await client.score(PROBLEM, [["expiring step"]], timeout=0.2)
                await busy

        asyncio.run(run())
        # the servicer counts a call before it answers: no wait needed
        codes = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'code="DEADLINE_EXCEEDED"' in codes and "stepscore_queue_depth" in codes


def test_sigterm_drains_then_exits_zero(slow_bundle: Path) -> None:
    metrics_port = _free_port()
    # the grace period is an upper bound (the drain ends when the work does): generous for a loaded machine
    with serve(slow_bundle, "--grace-seconds", "600", "--metrics-port", str(metrics_port)) as s:
        with Client(s.target) as client:
            client.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            channel = grpc.insecure_channel(s.target)
            # health's Watch pushes each change: the test waits on the stream, not on a clock
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            inflight = pool.submit(lambda: Client(s.target).score(PROBLEM, _heavy(200)))
            _wait_metric(metrics_port, "stepscore_queue_depth")  # the heavy call is admitted
            s.proc.send_signal(15)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            with Client(s.target) as late, pytest.raises(Unavailable):
                late.score(PROBLEM, [GOOD])
            channel.close()
            assert len(inflight.result(timeout=600).candidates) == 200  # in-flight work finished
        assert s.proc.wait(timeout=30) == 0


def test_second_server_on_a_taken_port_fails_clearly(server: ServerProcess, bundle: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", str(bundle), "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    # gRPC's core may log its own line first; ours comes last and says what happened
    assert "the port is taken" in proc.stderr.strip().splitlines()[-1]


def test_bearer_token(bundle: Path) -> None:
    token = "s3cret-token-123"
    with serve(bundle, env={"STEPSCORE_TOKEN": token}) as s:
        channel = grpc.insecure_channel(s.target)  # health needs no token
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        channel.close()
        with Client(s.target) as anonymous, pytest.raises(Unauthenticated):
            anonymous.score(PROBLEM, [GOOD])
        with Client(s.target, token="wrong-token-000") as wrong, pytest.raises(Unauthenticated):
            wrong.score(PROBLEM, [GOOD])
        with Client(s.target, token=token) as client:
            assert client.score(PROBLEM, [GOOD]).candidates

        async def stream() -> None:
            async with AsyncClient(s.target) as client:
                with pytest.raises(Unauthenticated):
                    async for _ in client.score_stream([ScoreRequest(PROBLEM, [GOOD], request_id="a")]):
                        pass
                # a refused stream with many requests still reports UNAUTHENTICATED, every time (grpcio's
                # asyncio client turns a write racing the refusal into INTERNAL; the client asks again, unary)
                many = [ScoreRequest(PROBLEM, [GOOD], request_id=f"r{i}") for i in range(20)]
                for _ in range(30):
                    with pytest.raises(Unauthenticated):
                        async for _ in client.score_stream(many):
                            pass

        asyncio.run(stream())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_tls_and_mtls(bundle: Path, tmp_path: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=stepscore-test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'client'}",
        )
        (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        )
    p = tmp_path
    tls = ("--tls-cert", str(p / "server.pem"), "--tls-key", str(p / "server.key"))
    with serve(bundle, *tls) as s:
        with Client(s.target, root_ca=p / "ca.pem") as client:
            assert client.score(PROBLEM, [GOOD]).candidates
        with Client(s.target) as plaintext, pytest.raises(Unavailable):
            plaintext.score(PROBLEM, [GOOD], timeout=5)
    with serve(bundle, *tls, "--client-ca", str(p / "ca.pem")) as s:
        with Client(s.target, root_ca=p / "ca.pem", cert=p / "client.pem", key=p / "client.key") as client:
            assert client.score(PROBLEM, [GOOD]).candidates
        with Client(s.target, root_ca=p / "ca.pem") as no_cert, pytest.raises(Unavailable):
            no_cert.score(PROBLEM, [GOOD], timeout=5)


def test_bad_settings_refuse_to_start(bundle: Path) -> None:
    cases = [
        (["--tls-cert", "x.pem"], "both a certificate"),
        (["--row-tokens", "999999"], "row_tokens"),
        (["--max-receive-message-bytes", "10"], "at least 1024"),
        (["--compute-nice", "20"], "compute_nice must be between 0 and 19"),
        (["--allocator", "mimalloc"], "invalid choice: 'mimalloc'"),
    ]
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "stepscore.cli", "serve", str(bundle), *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # a value from the environment passes argparse's choices unchecked: the server's config refuses it
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STEPSCORE_ALLOCATOR": "mimalloc"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "stepscore serve: error: allocator must be one of auto, jemalloc, glibc, got 'mimalloc'"


def _thread_nices(pid: int) -> dict[int, int]:
    """Every thread of process `pid`: its niceness (field 19 of /proc/<pid>/task/<tid>/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="niceness is per thread (and /proc is there) on Linux only")
def test_compute_threads_run_at_the_compute_niceness_and_the_event_loop_does_not(bundle: Path) -> None:
    # --compute-nice is absolute and the server inherits this process's niceness: ask for 7 above it
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base + 7 > 19:
        pytest.skip(f"this process already runs at niceness {base}: no room to lower threads by 7")
    for lowered_to in (base + 7, 0):
        # --threads 2: onnxruntime starts a pool thread of its own with the session
        with serve(bundle, "--compute-nice", str(lowered_to), "--threads", "2") as s:
            with Client(s.target) as client:
                client.score(PROBLEM, [GOOD])  # the tokenizing, packing and device threads start on demand
            nices = _thread_nices(s.proc.pid)
        assert nices[s.proc.pid] == base  # the main thread runs the event loop: the process's own niceness
        if lowered_to:
            # tokenizing, packing and device threads (one each at least) and onnxruntime's own pool thread
            assert len([tid for tid, n in nices.items() if n == lowered_to]) >= 4, nices
            assert set(nices.values()) == {base, lowered_to}, nices
        else:
            assert set(nices.values()) == {base}, nices
