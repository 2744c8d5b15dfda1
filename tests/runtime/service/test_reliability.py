"""Hostile and careless clients, each against a real `stepscore serve` process.

Each test names the defect it guards against (docs/reliability.md has the table, with measured figures); each
failed before the fix. Where a test waits for the server, it polls what the server reports (its metrics) under
a deadline.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from stepscore.errors import InvalidRequest, Unauthenticated
from stepscore.runtime.client import AsyncClient, Client
from stepscore.runtime.types import ScoreRequest
from stepscore.v1 import stepscore_pb2 as pb
from tests.helpers.bundles import DIGEST_KEY, edit_manifest, exported_bundle, manifest_digest
from tests.helpers.server import read_metric, serve

PROBLEM = "What is (2+3)*4?"
GOOD = ["2+3=5.", "5*4=20.", "The answer is 20."]
TOKEN = "s3cret-token-123"


def _heavy(n: int = 60, steps: int = 8) -> list[list[str]]:
    return [[f"candidate {k} step {i}: {k * 31 + i} plus {i} is {k * 31 + 2 * i}." for i in range(steps)] for k in range(n)]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Callable[..., Path]) -> Path:
    return tiny_bundle("qwen-prm")


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_models import build

    return exported_bundle("qwen-prm-hidden256", tmp_path_factory.mktemp("slow"), lambda d: build("qwen-prm", d, hidden=256))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll a live server until `condition` holds (the only waiting these tests do)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"the server never reported that {what} within {timeout:.0f}s")
        time.sleep(0.05)


def _score(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/stepscore.v1.StepScorer/Score",
        request_serializer=pb.ScoreRequest.SerializeToString,
        response_deserializer=pb.ScoreResponse.FromString,
    )


# --- 1. streams: bounded, fair, and a client that stops reading is cut off ---------------------------------


def test_a_stream_that_is_never_read_is_held_then_cut_off(bundle: Path) -> None:
    """Defect 1: the stream's queue was unbounded; a client sending and never reading grew the server by GBs."""
    port = _free_port()
    with serve(bundle, "--max-stream-inflight", "4", "--stream-stall-seconds", "1", "--metrics-port", str(port)) as s:
        sent = 0
        total = 2000
        steps = [f"s{i}" for i in range(200)]  # 200 step scores: answers of ~1 KB fill a client's window fast

        def requests() -> Iterator[Any]:
            nonlocal sent
            for k in range(total):
                sent += 1
                yield pb.ScoreRequest(request_id=f"r{k}", problem="p", candidates=[pb.Candidate(steps=pb.Steps(steps=steps))])

        # a client with a fixed 64 KiB window (no BDP growth), which never reads
        channel = grpc.insecure_channel(s.target, options=[("grpc.http2.bdp_probe", 0)])
        call = channel.stream_stream(
            "/stepscore.v1.StepScorer/ScoreStream",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreStreamResponse.FromString,
        )(requests())
        _until(lambda: read_metric(port, "stepscore_stream_stalls_total") == 1, "the stream was cut off")
        handled = read_metric(port, "stepscore_requests_total", method="ScoreStream")
        # the server stopped reading at the limit: most of what the client wrote was never read
        assert handled < total / 4, handled
        answers = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:  # now the client reads: what was in flight to it, then the cut-off
                answers += 1
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the client read no answer for 1s: stream closed" in (err.value.details() or "")
        assert answers <= handled
        channel.close()
        with Client(s.target) as client:  # the server is fine
            assert client.score(PROBLEM, [GOOD]).candidates


def test_one_stream_holds_at_most_its_share_of_the_queue(slow_bundle: Path) -> None:
    """Defect 1: one stream could take all the queue's slots; another client waited, then was refused."""
    port = _free_port()
    args = ("--max-queued-requests", "8", "--max-batch-tokens", "2048", "--row-tokens", "512")
    with serve(slow_bundle, *args, "--metrics-port", str(port)) as s:
        with Client(s.target) as warm:
            warm.wait_ready()

        async def run() -> tuple[list[Any], Any]:
            async with AsyncClient(s.target) as greedy:
                requests = [ScoreRequest(PROBLEM, _heavy(40), request_id=f"g{k}") for k in range(12)]
                answers: list[Any] = []

                async def consume() -> None:
                    async for item in greedy.score_stream(requests):
                        answers.append(item)

                task = asyncio.create_task(consume())
                # the stream's share with one stream open is half the queue: 4 of 8 slots
                await asyncio.to_thread(_until, lambda: read_metric(port, "stepscore_queue_depth") >= 4, "4 requests queued")
                async with AsyncClient(s.target) as other:
                    other_result = await other.score(PROBLEM, [GOOD])  # not refused: half the queue stays free
                await task
                return answers, other_result

        answers, other = asyncio.run(run())
    assert len(other.candidates) == 1
    assert len(answers) == 12 and all(a.error is None for a in answers)  # the stream waited instead of being refused


# --- 2 and 4. sizes are refused before any tokenization --------------------------------------------------


def test_oversized_requests_are_refused_before_tokenization(bundle: Path) -> None:
    """Defects 2 and 4: a 15 MiB problem was tokenized before being refused (23 s); a million candidates too."""
    with serve(bundle, "--max-receive-message-bytes", str(32 << 20)) as s:
        with Client(s.target, max_message_bytes=32 << 20) as client:
            cases: list[tuple[Callable[[], Any], str, str]] = [
                (lambda: client.score("word " * (3 << 20), [GOOD]), "problem", "the limit is 262144"),  # 15 MiB
                (lambda: client.score(PROBLEM, [GOOD] * 1025), "candidates", "the limit is 1024"),
                (lambda: client.score(PROBLEM, [["a"] * 1025]), "candidates[0].steps", "the limit is 1024"),
                (lambda: client.score(PROBLEM, [GOOD, ["x" * 70_000]]), "candidates[1].steps[0]", "the limit is 65536"),
                (lambda: client.score(PROBLEM, [GOOD], prefix_steps=["y" * 70_000]), "prefix_steps[0]", "65536"),
                (lambda: client.score(PROBLEM, [["z" * 30_000] * 4] * 40), "request", "over 4194304 characters"),
            ]
            for call, field, message in cases:
                with pytest.raises(InvalidRequest) as err:
                    call()
                assert err.value.field == field and message in err.value.message, (field, err.value)
            info = client.info()
            assert (info["max_candidates"], info["max_problem_chars"], info["max_step_chars"]) == (1024, 262144, 65536)
            assert (info["max_steps_per_candidate"], info["max_request_chars"]) == (1024, 4194304)
            assert info["max_stream_inflight"] == 64 and info["stream_stall_seconds"] == 30.0
            assert client.score(PROBLEM, [GOOD]).candidates  # the server is fine

        channel = grpc.insecure_channel(s.target, options=[("grpc.max_send_message_length", 32 << 20)])
        million = pb.ScoreRequest(problem=PROBLEM, candidates=[pb.Candidate(steps=pb.Steps(steps=["a"]))] * 1_000_000)
        with pytest.raises(grpc.RpcError) as rpc:  # 7 MB of candidates: refused by count, nothing converted
            _score(channel)(million)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (rpc.value.details() or "").startswith("candidates: 1000000 candidates; the limit is 1024")
        channel.close()

        async def stream() -> Any:  # in a stream, the request's own error; the stream goes on
            async with AsyncClient(s.target) as client:
                requests = [
                    ScoreRequest("p" * 300_000, [GOOD], request_id="big"),
                    ScoreRequest(PROBLEM, [GOOD], request_id="ok"),
                ]
                return [item async for item in client.score_stream(requests)]

        items = {item.request_id: item for item in asyncio.run(stream())}
        assert isinstance(items["big"].error, InvalidRequest) and items["big"].error.field == "problem"
        assert items["ok"].result is not None

    with serve(bundle, "--max-candidates", "50") as s, Client(s.target) as client:  # the flags set the limits
        with pytest.raises(InvalidRequest, match="51 candidates; the limit is 50"):
            client.score(PROBLEM, [GOOD] * 51)
        assert client.info()["max_candidates"] == 50


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc (Linux)")
def test_refused_large_requests_do_not_stay_resident(bundle: Path) -> None:
    """Defect 2: what a refused request held (its 15 MiB problem, parsed) stayed resident, request after request."""
    with serve(bundle, "--max-receive-message-bytes", str(32 << 20)) as s:
        channel = grpc.insecure_channel(s.target, options=[("grpc.max_send_message_length", 32 << 20)])
        big = pb.ScoreRequest(problem="word " * (3 << 20), candidates=[pb.Candidate(steps=pb.Steps(steps=["a"]))])
        for k in range(9):
            with pytest.raises(grpc.RpcError) as err:
                _score(channel)(big)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            if k == 0:  # the first one warms the allocator up
                base = _rss_mb(s.proc.pid)
        grown = _rss_mb(s.proc.pid) - base
        channel.close()
    # 8 more requests of 15 MiB each (four copies each on the way: bytes, parsed, the problem's str): it used to
    # grow by ~50 MB per request; now the memory is reused
    assert grown < 8 * 15, grown


def test_the_text_cache_is_bounded_in_bytes(bundle: Path) -> None:
    """Defect 8: the cache was bounded by entries, so RSS grew ~13 MB/min in a soak of long distinct texts."""
    port = _free_port()
    with serve(bundle, "--text-cache-mb", "1", "--metrics-port", str(port)) as s, Client(s.target) as client:
        for k in range(60):
            client.score(f"problem {k}: " + "add the numbers then check " * 400, [GOOD], truncate_left=True)
        held = read_metric(port, "stepscore_text_cache_bytes")
    assert 0 < held <= 1 << 20


# --- 6. overload is refused at admission, before the payload --------------------------------------------


def test_overload_is_refused_before_the_payload_is_read(slow_bundle: Path) -> None:
    """Defect 6: refusals came after parsing (and queueing behind other work): p50 347 ms under a storm."""
    port = _free_port()
    with serve(slow_bundle, "--max-queued-requests", "1", "--max-wait-ms", "0", "--metrics-port", str(port)) as s:
        with Client(s.target) as warm:
            warm.wait_ready()
        busy = threading.Thread(target=lambda: Client(s.target).score(PROBLEM, _heavy(600)))
        busy.start()
        _until(lambda: read_metric(port, "stepscore_queue_depth") >= 1, "the queue is full")
        channel = grpc.insecure_channel(s.target)
        answered = threading.Event()

        def never_sent() -> Iterator[bytes]:
            answered.wait(timeout=20)  # the message is sent only after the answer came (or never, here)
            yield pb.ScoreRequest(problem=PROBLEM, candidates=[pb.Candidate(steps=pb.Steps(steps=GOOD))]).SerializeToString()

        score = channel.stream_unary("/stepscore.v1.StepScorer/Score")  # raw bytes; the server sees a unary call
        with pytest.raises(grpc.RpcError) as err:
            score(never_sent(), timeout=15)
        answered.set()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in (err.value.details() or "")
        # a payload that would not even parse is refused for the overload, not parsed first
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/stepscore.v1.StepScorer/Score")(b"\x12\x03\xff\xfe\xfd")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
        busy.join()


# --- 7 and 8. every call counted; authorization; metrics address; ports checked first ----------------------


def test_every_call_is_counted_even_those_refused_before_the_servicer(bundle: Path) -> None:
    """Defect 7: metrics missed UNAUTHENTICATED calls and deadlines that passed before the handler ran."""
    port = _free_port()
    with serve(bundle, "--metrics-port", str(port), env={"STEPSCORE_TOKEN": TOKEN}) as s:
        with Client(s.target) as anonymous:
            for _ in range(2):
                with pytest.raises(Unauthenticated):
                    anonymous.score(PROBLEM, [GOOD])
            with pytest.raises(Unauthenticated):
                anonymous.info()
        with Client(s.target, token=TOKEN) as client:
            assert client.score(PROBLEM, [GOOD]).candidates
        channel = grpc.insecure_channel(s.target)
        late = threading.Event()

        def slow() -> Iterator[bytes]:
            late.wait(timeout=10)  # the request message arrives after the call's deadline
            yield b""

        meta = (("authorization", f"Bearer {TOKEN}"),)
        for method in ("Info", "Score"):
            with pytest.raises(grpc.RpcError) as err:
                channel.stream_unary(f"/stepscore.v1.StepScorer/{method}")(slow(), timeout=0.5, metadata=meta)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        late.set()
        channel.close()

        def calls(method: str, code: str) -> float:
            return read_metric(port, "stepscore_calls_total", method=f"/stepscore.v1.StepScorer/{method}", code=code)

        _until(lambda: calls("Info", "DEADLINE_EXCEEDED") == 1 and calls("Score", "DEADLINE_EXCEEDED") == 1, "the expiries")
        assert calls("Score", "UNAUTHENTICATED") == 2 and calls("Info", "UNAUTHENTICATED") == 1
        assert calls("Score", "OK") == 1


def test_a_duplicated_authorization_header_is_refused(bundle: Path) -> None:
    """Defect 8: with two authorization headers the last one won."""
    with serve(bundle, env={"STEPSCORE_TOKEN": TOKEN}) as s:
        channel = grpc.insecure_channel(s.target)
        info = channel.unary_unary("/stepscore.v1.StepScorer/Info")
        good, bad = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong-token-000")
        assert info(pb.InfoRequest().SerializeToString(), metadata=(good,))
        for metadata in ((bad, good), (good, bad), (good, good)):
            with pytest.raises(grpc.RpcError) as err:
                info(pb.InfoRequest().SerializeToString(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "more than one authorization header" in (err.value.details() or "")
        channel.close()


def test_metrics_bind_their_own_address(bundle: Path) -> None:
    """Defect 8: metrics were served on --host, with no way to keep them apart."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("this machine has no 127.0.0.2 loopback address")
    finally:
        probe.close()
    port = _free_port()
    with serve(bundle, "--metrics-host", "127.0.0.2", "--metrics-port", str(port)):
        text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
        assert "stepscore_queue_depth" in text
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_taken_metrics_port_fails_start_up_before_anything_opens(bundle: Path) -> None:
    """Defect 8: a busy metrics port printed an event-loop traceback after the gRPC port was already open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics_port = taken.getsockname()[1]
        grpc_port = _free_port()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "stepscore.cli",
                "serve",
                str(bundle),
                "--port",
                str(grpc_port),
                "--metrics-port",
                str(metrics_port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and "ready on" not in proc.stdout
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stepscore")]
    assert lines == [f"stepscore serve: error: cannot serve metrics on 127.0.0.1:{metrics_port}: Address already in use"]


# --- 3 and 5. bundles: contained, and meaning what they say; nothing served otherwise --------------------


def _outside_graph(b: Path) -> None:
    shutil.copy(b / "model.onnx", b.parent / "outside.onnx")

    def edit(m: dict[str, Any]) -> None:
        m["graph"]["file"] = "../outside.onnx"
        m["files"]["../outside.onnx"] = m["files"].pop("model.onnx")

    edit_manifest(b, edit)


def _outside_size(b: Path) -> None:
    (b.parent / "secret.bin").write_bytes(b"s" * 12345)

    def edit(m: dict[str, Any]) -> None:
        m["files"]["../secret.bin"] = {"sha256": "0" * 64, "size": 1}

    edit_manifest(b, edit)
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../secret.bin"]["size"] = 1
    m[DIGEST_KEY] = manifest_digest(m)
    (b / "manifest.json").write_text(json.dumps(m))


def _escaping_link(b: Path) -> None:
    shutil.copy(b / "tokenizer.json", b.parent / "tokenizer-outside.json")
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(b.parent / "tokenizer-outside.json")


def _retag(b: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        for seg in m["format"]["step"]:
            if seg.get("read") and seg.get("ids"):
                seg["ids"] = [seg["ids"][-1] + 1]
        m["head"]["tag_id"] += 1

    edit_manifest(b, edit)


def _external_data_outside(b: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="rewriting a graph's external data path needs the onnx package")
    for path in sorted(b.glob("*.onnx")):  # every graph: which ones a server loads depends on its settings
        graph = onnx.load(str(path), load_external_data=False)
        for tensor in graph.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../outside.data"
        onnx.save(graph, str(path))
    shutil.copy(b / "model.onnx.data", b.parent / "outside.data")
    edit_manifest(b, lambda m: None)  # hashes and digest of the edited graph recomputed


BUNDLE_EDITS: list[tuple[str, Callable[[Path], None], str]] = [
    ("graph outside the bundle", _outside_graph, "manifest graph.file '../outside.onnx' is not a plain file name"),
    ("outside file size", _outside_size, "manifest files['../secret.bin'] '../secret.bin' is not a plain file name"),
    ("link leading outside", _escaping_link, "tokenizer.json is a link leading outside the bundle"),
    ("edited tag id", _retag, "the manifest records '<extra_0>'"),
    ("family and head disagree", lambda b: edit_manifest(b, lambda m: m["head"].update(family="lm_pair")), "head.family"),
    ("graph outputs", lambda b: edit_manifest(b, lambda m: m["graph"].update(outputs=["x"])), "graph.outputs"),
    ("edit without digest", lambda b: edit_manifest(b, lambda m: m.update(preset="x"), reseal=False), "edited after export"),
    ("external data outside", _external_data_outside, "onnxruntime refused the graph: External data path"),
]


@pytest.mark.parametrize(("edit", "message"), [(e, m) for _, e, m in BUNDLE_EDITS], ids=[n for n, _, _ in BUNDLE_EDITS])
def test_a_bad_bundle_is_one_line_of_error_and_nothing_served(
    bundle: Path, tmp_path: Path, edit: Callable[[Path], None], message: str
) -> None:
    """Defects 3 and 5 (and the raw onnxruntime traceback of defect 8)."""
    from stepscore.runtime.default_model import default_bundle

    source = default_bundle() if edit is _external_data_outside else bundle  # the default model has external data
    copy = Path(shutil.copytree(source, tmp_path / "bundle"))
    edit(copy)
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", str(copy), "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "ready on" not in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "12345" not in proc.stderr, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("stepscore serve: error:")]
    assert len(ours) == 1 and message in ours[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-stream-inflight", "0"], "max_stream_inflight must be at least 1"),
        (["--stream-stall-seconds", "0"], "stream_stall_seconds must be positive"),
        (["--max-candidates", "0"], "max_candidates must be a positive integer"),
        (["--max-problem-chars", "9999999999"], "could never pass"),
        (["--text-cache-mb", "0"], "text_cache_bytes must be positive"),
    ],
)
def test_impossible_limits_refuse_to_start(bundle: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepscore.cli", "serve", str(bundle), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
